"""Pictures: loss curves, attention maps."""
