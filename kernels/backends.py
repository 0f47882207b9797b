"""Backend choice for the functional ops: triton on CUDA, the PyTorch reference elsewhere."""
from __future__ import annotations

from typing import Callable

import torch

_BACKENDS: dict[str, dict[str, Callable]] = {}


def register_backend(op: str, name: str, fn: Callable) -> None:
    _BACKENDS.setdefault(op, {})[name] = fn


def available_backends(op: str) -> list[str]:
    return sorted(_BACKENDS.get(op, {}))


def choose_backend(op: str, backend: str | None, x: torch.Tensor) -> Callable:
    """The implementation of ``op`` to run on ``x``.

    ``backend=None`` picks "triton" for CUDA tensors when a Triton kernel is registered for the op,
    else "reference". A named backend that the op lacks is a ValueError listing the ones it has.
    """
    impls = _BACKENDS.get(op, {})
    if backend is None:
        backend = "triton" if x.is_cuda and "triton" in impls else "reference"
    if backend not in impls:
        raise ValueError(f"{op} has no backend {backend!r}; available: {available_backends(op)}")
    return impls[backend]
