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
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"


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
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_checkpoint(root: Path, step: int) -> Path:
    """Main process: an empty ``step_<step>.tmp/`` folder (a leftover of a killed write is cleared)."""
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """Every process: its generator states into the checkpoint being written."""
    _save_tensors(rng_state(), tmp / f"rng_rank{rank}.safetensors")


def commit_checkpoint(tmp: Path, tensors: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    """Main process: write tensors and state, rename into place, point ``latest.json`` at it, prune old ones."""
    _save_tensors(tensors, tmp / TENSORS)
    _fsync_write(tmp / STATE, lambda f: f.write(json.dumps(state, indent=1).encode()))
    root, final = tmp.parent, tmp.with_suffix("")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    pointer = root / f"{LATEST}.tmp"
    _fsync_write(pointer, lambda f: f.write(json.dumps({"step": state["step"], "folder": final.name}).encode()))
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")[:-keep]:
        shutil.rmtree(old)
    return final


def find_latest(root: Path) -> Path | None:
    """The checkpoint folder named by ``<root>/latest.json`` (``root``: a run folder or its ``checkpoints/``)."""
    root = Path(root)
    for folder in (root, root / "checkpoints"):
        pointer = folder / LATEST
        if pointer.is_file():
            return folder / json.loads(pointer.read_text())["folder"]
    return None


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / TENSORS))


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE).read_text())


def read_rng(folder: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """The generator states process ``rank`` saved, or None if the checkpoint had fewer processes."""
    path = Path(folder) / f"rng_rank{rank}.safetensors"
    return load_file(str(path)) if path.is_file() else None
