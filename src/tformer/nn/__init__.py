"""Building blocks. No model-family names in here: only mechanisms."""
