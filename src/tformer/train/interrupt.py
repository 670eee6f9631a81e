"""Ctrl-C during training: the first stops the run after the current step with a resumable
checkpoint; a second ends the process at once (SIGINT's default action). Checkpoints are written
atomically (`tformer.io.atomic_path`), so ending mid-save leaves the previous checkpoint intact."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; a resumable checkpoint of `step` is at `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path, resume: str):
        super().__init__(f"interrupted at step {step}: resumable checkpoint {checkpoint}; resume with {resume}")
        self.step, self.checkpoint, self.resume = step, checkpoint, resume


class StopOnInterrupt:
    """While entered, the first SIGINT sets `requested` (the loop polls it between steps) instead of
    raising KeyboardInterrupt, and restores SIGINT's default action for the second one. A no-op
    outside the main thread, where Python delivers no signals."""

    NOTICE = "Ctrl-C: saving a resumable checkpoint after this step (Ctrl-C again quits at once, unsaved)"

    def __init__(self):
        self.requested = False
        self._installed, self._previous = False, None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)  # None: installed outside Python
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"\n{self.NOTICE}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)


def resume_command(cfg) -> str:
    """The `tformer train` or `tformer finetune` command line this process was started with, less
    --overwrite and with --resume; a Python hint where training was not started from the command line."""
    argv = sys.argv[1:]
    if argv[:1] not in (["train"], ["finetune"]):
        return f"{type(cfg).__name__}(..., out_dir={cfg.out_dir!r}, resume=True)"
    args = [a for a in argv if _option(a) not in ("--resume", "--no-resume", "--overwrite", "--no-overwrite")]
    args.append("--resume")
    if cfg.overwrite and "--overwrite" not in map(_option, argv):  # set in a config file: a flag overrides it
        args.append("--no-overwrite")
    return shlex.join(["tformer", *args])


def _option(arg: str) -> str:
    """An argument's option name in its dashed spelling (--no_resume -> --no-resume)."""
    return "--" + arg[2:].replace("_", "-") if arg.startswith("--") else arg
