"""Training: one loop for pretraining (and later SFT, LoRA, DPO), optimiser, schedules, checkpoints."""
