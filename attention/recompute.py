"""Tensors that autograd would keep for the backward, kept instead as the recipe that rebuilds them."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


class _Recipe:
    """What a saved tensor is kept as: the function that rebuilds it."""

    def __init__(self, build: Callable[[], torch.Tensor]) -> None:
        self.build = build


def _other_hooks_active() -> bool:
    """Whether saved-tensor hooks are set already (activation checkpointing's, a user's); True where this torch
    cannot tell, so that the recipes then stay off."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _signature(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values without holding it: memory, dtype, shape, strides, device."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device


@contextlib.contextmanager
def recomputed_in_backward(*recipes: tuple[torch.Tensor, Callable[[], torch.Tensor]]) -> Iterator[None]:
    """Within the block, a tensor saved for the backward that is one of the ``(tensor, build)`` pairs' tensors
    (the same memory, dtype, shape and strides) is kept as ``build``, which rebuilds it (no grad) when the
    backward reads it; other saved tensors are kept as usual. Where the tensor is large and ``build`` cheap
    (a small matrix product), its memory is free from the forward to the backward. A no-op without autograd,
    under ``torch.compile`` and inside other saved-tensor hooks (activation checkpointing, which keeps its own
    recipe: the whole forward)."""
    if not recipes or not torch.is_grad_enabled() or torch.compiler.is_compiling() or _other_hooks_active():
        yield
        return
    builds = {_signature(t): build for t, build in recipes}     # the hooks, kept by autograd, hold no tensor
    del recipes

    def pack(t: torch.Tensor) -> torch.Tensor | _Recipe:
        build = builds.get(_signature(t))
        return t if build is None else _Recipe(build)

    def unpack(saved: torch.Tensor | _Recipe) -> torch.Tensor:
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.build()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
