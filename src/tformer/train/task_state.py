"""The resumable state of an encoder or encoder-decoder task run (train/encoder_tasks.py): one file,
OUT/last.pt, written atomically every `save_every` steps and on Ctrl-C. It holds the trained parameters
(all of them, or with LoRA the adapters and the task head: the frozen rest is rebuilt from the start), the
optimiser's state, the step, the evaluations so far, the RNG states and the tokenizer (a run from a
preset trains its vocabulary from the data, so a resumed run checks it got the same one). Batches are a
function of the step (data/seq2seq_splits.py, data/mlm.py, data/classify.py), so the resumed run sees
the batches the first run would have.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.io import atomic_path

STATE_FILE = "last.pt"


def save_state(out_dir: str | Path, model, optimizer, tokenizer, step: int, history: list) -> Path:
    path = Path(out_dir) / STATE_FILE
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}  # the rest is the start's
    state = {"model": trained, "optimizer": optimizer.state_dict(), "step": step, "history": history,
             "tokenizer": tokenizer.to_str(), "cpu_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def restore_state(out_dir: str | Path, model, optimizer, tokenizer) -> tuple[int, list]:
    """Load OUT/last.pt into `model` and `optimizer`; (its step, its evaluations)."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist (a run saves it every --save-every steps and on "
                         "Ctrl-C): drop --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file
        raise ValueError(f"--resume: {path} is not a readable run state ({type(e).__name__}): drop --resume "
                         "to start afresh") from None
    if state["tokenizer"] != tokenizer.to_str():
        raise ValueError(f"--resume: the tokenizer differs from the one {path} was trained with (the data or "
                         "--vocab-size changed): resume with the same options, or start afresh")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = state["model"]
    wrong = sorted(set(params) ^ set(saved)) or [n for n in params if params[n].shape != saved[n].shape]
    if wrong:
        raise ValueError(f"--resume: {path} holds another model (differing in {wrong[0]}): resume with the same "
                         "checkpoint, --method and --model options")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["cpu_rng"])
    return state["step"], state["history"]
