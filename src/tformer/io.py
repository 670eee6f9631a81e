"""Files: atomic writes, safetensors directories (single file or sharded index), strict loading.

Every file and directory tformer writes goes through `atomic_path` (or `atomic_write_text`,
`write_safetensors` on top of it): an interrupted write leaves the previous version or nothing,
never a partial one. A directory that must never be absent, even for a moment, is published
under a symlink that `point_symlink` swaps in one rename. Nothing here unpickles: weights are
safetensors only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model; the message says which."""


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write into; on a clean exit it becomes `path`.

    A file: the body writes the temporary file (any writer that takes a path); it is fsynced and
    `os.replace`d onto `path`, so readers see the old file or the new one, never half of one.
    `directory=True`: the body fills an empty temporary directory; every file in it is fsynced,
    then the directory is renamed to `path`. An existing directory at `path` is renamed aside
    first and deleted after, so `path` is briefly absent but never partial.
    `replace=False`: an existing `path` is kept and the new copy discarded (concurrent writers
    of the same content, e.g. one shard cache per data-parallel rank).
    On an exception the temporary copy is deleted and `path` is untouched. The temporary name
    keeps `path`'s suffix (writers such as `savefig` and `np.save` go by it). The result has mode
    0o666 (directories 0o777) less the umask, as `open` would create `path`, also where the
    writer replaced the temporary file with one of its own (safetensors writes 0o600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path, directory)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # the umask applied by the kernel
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync_tree(tmp)
        if not replace and path.exists():
            _remove(tmp)
        elif directory:
            _rename_dir(tmp, path, replace)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """`tensors` as one safetensors file, written through `atomic_path`."""
    with atomic_path(path) as tmp:
        # safetensors refuses shared storage (tied weights): the caller drops ties; copies make views safe
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def point_symlink(link: str | Path, target: str | Path) -> None:
    """Make `link` a symlink to the directory `target` (stored relative to `link`'s folder) in one
    step: a new link is made beside it and `os.replace`d over it, which rename(2) does atomically,
    so a reader of `link` finds the old target or the new one and never nothing. Raises
    IsADirectoryError where `link` is a real directory, OSError where symlinks are unavailable."""
    link = Path(link)
    relative = os.path.relpath(Path(target), link.parent)
    for _ in range(100):
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.symlink(relative, tmp, target_is_directory=True)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary link beside {link}")
    try:
        if link.is_dir() and not link.is_symlink():
            raise IsADirectoryError(f"{link} is a directory, not a link")
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(link.parent)


def _create_temp(path: Path, directory: bool) -> Path:
    """A new file or directory `.{name}.{random}.tmp{suffix}` beside `path`; os.open and os.mkdir
    apply the umask to the mode they are given (tempfile.mkstemp would create it 0o600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and directory under a directory: the data is on disk before
    the rename that publishes it."""
    if not path.is_dir():
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync_dir(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a directory's entries (the renames into it); skipped where a directory cannot be
    opened (Windows)."""
    try:
        _fsync(path)
    except OSError:
        pass


def _rename_dir(new: Path, dst: Path, replace: bool) -> None:
    """Rename directory `new` to `dst`. An existing `dst` is moved into a temporary directory
    beside it, `new` renamed in, and the old one deleted; with `replace=False` it stays instead."""
    try:
        os.rename(new, dst)  # fails when dst is a non-empty directory
        return
    except OSError:
        if not dst.exists():
            raise
        if not replace:  # another writer finished first
            _remove(new)
            return
    old = _create_temp(dst, directory=True)
    os.rename(dst, old / dst.name)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt: re-export it") from e


def read_safetensors_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: `model.safetensors.index.json` shards, or every *.safetensors."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'; the index is corrupt")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {directory}; tformer reads safetensors only "
            "(convert .bin/.pt checkpoints with HF transformers' save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in the shard index but missing")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); the checkpoint is corrupt") from e
    return tensors


def load_state_dict_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model` (possibly on meta) or fail naming the bad keys or shapes."""
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"the config expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=True)
