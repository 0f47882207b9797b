"""Resumable training checkpoints: tensors in safetensors, everything else in a small JSON file.

A checkpoint is a folder ``<run>/checkpoints/step_<step>/`` holding

- ``tensors.safetensors``: the model (``model.*``), its EMA (``ema.*``) and the optimizer's tensors
  (``optimizer.*``);
- ``rng_rank<r>.safetensors``: each process's random generator states as tensors (Python, NumPy,
  torch CPU and CUDA);
- ``state.json``: step and data position, the recipe, and the non-tensor parts of the optimizer,
  scheduler and loss-scaler states, with every tensor replaced by its key in ``tensors.safetensors``.

Nothing is pickled, so loading runs no stored code. Writes are atomic: a checkpoint is written into
``step_<step>.tmp/``, flushed, renamed, and only then named in ``checkpoints/latest.json`` (itself
replaced atomically); a run killed at any moment leaves the previous checkpoint intact and named.
A write that fails (disk full, read-only folder) is an ``OSError`` naming the file, and the previous
checkpoint stays the latest. ``state.json`` records the SHA-256 of every tensor file, checked when the
file is read: corrupted bytes are a ``ValueError`` naming the file, as are a truncated tensor file and
an unreadable ``state.json`` or ``latest.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUMS = "sha256"                # state.json's key: {tensor file name: SHA-256 hex digest}


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Re-raise a failed write inside (disk full, read-only folder) as one ``OSError`` naming the file."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        message = f"cannot write {getattr(e, 'filename', None) or path}: {getattr(e, 'strerror', None) or e}"
        code = getattr(e, "errno", None)
        raise (OSError(code, message) if code else OSError(message)) from e


def read_json(path: Path, what: str, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object at ``path``; a ``ValueError`` naming the file if it is not one or lacks one of ``keys``."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"{what} {path} is not a subquad {Path(path).name} (expected the keys {', '.join(keys)})")
    return data


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a ``ValueError`` naming it if it is truncated, not a safetensors
    file, or (given ``expected_sha256``) not the bytes that were saved."""
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"checkpoint file {path} cannot be read, it is truncated or not a safetensors file ({e})") \
            from e
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise ValueError(f"checkpoint file {path} is corrupted: its SHA-256 differs from the one recorded in "
                         f"{STATE} when it was saved")
    return tensors


def encode_tree(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-ready copy of a nested state (dicts, lists, tuples, numbers, strings, tensors).

    Tensors move into ``tensors`` under dotted keys; dict keys keep their type (an optimizer's
    state is keyed by int)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"dict": [[k, encode_tree(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [encode_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def decode_tree(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_tree``."""
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: decode_tree(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [decode_tree(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


def rng_state() -> dict[str, torch.Tensor]:
    """This process's Python, NumPy and torch (CPU, current CUDA device) generator states, as tensors."""
    _, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python.mt": torch.tensor(mt, dtype=torch.int64),
        "python.gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy.keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy.pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy.cached": torch.tensor([cached], dtype=torch.float64),
        "torch.cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch.cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` saved."""
    gauss = state["python.gauss"].item()
    random.setstate((3, tuple(state["python.mt"].tolist()), None if gauss != gauss else gauss))
    pos, has_gauss = state["numpy.pos"].tolist()
    np.random.set_state(("MT19937", state["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
                         state["numpy.cached"].item()))
    torch.set_rng_state(state["torch.cpu"])
    if "torch.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch.cuda"])


def _fsync_write(path: Path, write) -> None:
    with writing(path), open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with writing(path):
        save_file(tensors, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def begin_checkpoint(root: Path, step: int) -> Path:
    """Main process: an empty ``step_<step>.tmp/`` folder (a leftover of a killed write is cleared)."""
    tmp = root / f"step_{step:08d}.tmp"
    with writing(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """Every process: its generator states into the checkpoint being written."""
    _save_tensors(rng_state(), tmp / f"rng_rank{rank}.safetensors")


def commit_checkpoint(tmp: Path, tensors: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    """Main process: write tensors and state (with the tensor files' checksums), rename into place, point
    ``latest.json`` at it, prune old ones. On a failed write the partial folder is removed and the
    previous checkpoint stays the latest."""
    root, final = tmp.parent, tmp.with_suffix("")
    try:
        _save_tensors(tensors, tmp / TENSORS)
        state = {**state, CHECKSUMS: {p.name: sha256(p) for p in sorted(tmp.glob("*.safetensors"))}}
        _fsync_write(tmp / STATE, lambda f: f.write(json.dumps(state, indent=1).encode()))
        with writing(final):
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f"{LATEST}.tmp"
    _fsync_write(pointer, lambda f: f.write(json.dumps({"step": state["step"], "folder": final.name}).encode()))
    with writing(root / LATEST):
        os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")[:-keep]:
        shutil.rmtree(old)
    return final


def find_latest(root: Path) -> Path | None:
    """The checkpoint folder named by ``<root>/latest.json`` (``root``: a run folder or its ``checkpoints/``);
    a ``ValueError`` naming ``latest.json`` if it is unreadable or names a folder that is not there."""
    root = Path(root)
    for folder in (root, root / "checkpoints"):
        pointer = folder / LATEST
        if pointer.is_file():
            latest = folder / read_json(pointer, "checkpoint pointer", ("folder",))["folder"]
            if not (latest / STATE).is_file():
                raise ValueError(f"checkpoint pointer {pointer} names {latest}, which is not a checkpoint folder")
            return latest
    return None


def read_state(folder: Path) -> dict:
    """The ``state.json`` of a checkpoint folder (a ``ValueError`` naming it if it is unreadable)."""
    return read_json(Path(folder) / STATE, "checkpoint state", ("step", "task", "model"))


def _read_checked(folder: Path, name: str) -> dict[str, torch.Tensor]:
    checksums = read_state(folder).get(CHECKSUMS) or {}     # absent in checkpoints of older versions
    return load_safetensors(Path(folder) / name, checksums.get(name))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder, checked against the checksum recorded at save."""
    return _read_checked(folder, TENSORS)


def read_rng(folder: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """The generator states process ``rank`` saved, or None if the checkpoint had fewer processes."""
    name = f"rng_rank{rank}.safetensors"
    return _read_checked(folder, name) if (Path(folder) / name).is_file() else None
