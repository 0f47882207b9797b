"""Backends of the functional ops, each declaring what it can run; one policy picks among them.

Every op registers its backends in order of preference with the requirements each needs (a CUDA
tensor, a dtype, a head dim, a tile size: ``Requirement``). ``backend=None`` takes
the first automatic backend whose requirements hold; when that is the PyTorch reference on a CUDA
tensor it warns once, naming what the faster backend lacked. A backend named explicitly that
cannot run is a ValueError naming the requirement that failed.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

Facts = Mapping[str, Any]     # what a call offers: device, dtype, head_dim, value_dim, grid, and op-specific facts

TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"      # read once, as triton.jit does


@dataclass(frozen=True)
class Requirement:
    """One thing a backend needs of a call: ``what`` says it ("a CUDA tensor"), ``holds(facts)`` checks it.
    ``preference``: not a limit of the backend but a choice (another backend is faster there), so falling
    back past it is not warned about."""

    what: str
    holds: Callable[[Facts], bool]
    preference: bool = False


@dataclass(frozen=True)
class Backend:
    """An implementation of an op. ``auto``: may be picked when no backend is named (peers kept for
    comparison, such as natten, are not)."""

    name: str
    fn: Callable
    requires: tuple[Requirement, ...] = ()
    auto: bool = True

    def unmet(self, facts: Facts) -> Requirement | None:
        """The first requirement that ``facts`` do not meet, or None."""
        return next((r for r in self.requires if not r.holds(facts)), None)


_BACKENDS: dict[str, list[Backend]] = {}
_WARNED: set[tuple[str, str]] = set()
_CHOSEN: dict[tuple, Callable] = {}      # per call signature: the choice is made once, not per call
_CHOSEN_MAX = 4096


def register_backend(op: str, name: str, fn: Callable, requires: tuple[Requirement, ...] = (),
                     auto: bool = True) -> None:
    """Add a backend to ``op``; backends are tried in the order they are registered."""
    backends = _BACKENDS.setdefault(op, [])
    if any(b.name == name for b in backends):
        raise ValueError(f"{op} already has a backend {name!r}")
    backends.append(Backend(name, fn, tuple(requires), auto))
    _CHOSEN.clear()


def available_backends(op: str) -> list[str]:
    """The backends registered for ``op``, sorted."""
    return sorted(b.name for b in _BACKENDS.get(op, []))


def backend_names() -> list[str]:
    """Every backend name of any op, sorted."""
    return sorted({b.name for backends in _BACKENDS.values() for b in backends})


def backends_of(op: str) -> tuple[Backend, ...]:
    """The backends of ``op`` in order of preference."""
    return tuple(_BACKENDS.get(op, []))


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd records a call on ``tensors`` (grad mode on and one of them requires a gradient)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_facts(x: torch.Tensor, v: torch.Tensor | None = None, **extra: Any) -> dict[str, Any]:
    """The facts of a call on (B, heads, N, d) tensors that requirements read."""
    return dict(device=x.device, dtype=x.dtype, head_dim=x.shape[-1],
                value_dim=(x if v is None else v).shape[-1], **extra)


def choose_backend(op: str, backend: str | None, x: torch.Tensor, v: torch.Tensor | None = None,
                   **facts: Any) -> Callable:
    """The implementation of ``op`` for a call on ``x`` (and values ``v``; facts: ``call_facts(x, v, **facts)``).

    ``backend=None``: the first automatic backend whose requirements hold. A named backend that the
    op lacks, or whose requirements fail, is a ValueError saying why. Remembered per call signature
    (op, backend and facts), so a repeated call costs one dictionary lookup.
    """
    if torch.compiler.is_compiling():
        return _choose(op, backend, call_facts(x, v, **facts))
    key = (op, backend, x.device, x.dtype, x.shape[-1], (x if v is None else v).shape[-1], *facts.items())
    fn = _CHOSEN.get(key)
    if fn is None:
        fn = _choose(op, backend, call_facts(x, v, **facts))
        if len(_CHOSEN) >= _CHOSEN_MAX:
            _CHOSEN.clear()
        _CHOSEN[key] = fn
    return fn


def _choose(op: str, backend: str | None, call: dict[str, Any]) -> Callable:
    backends = _BACKENDS.get(op, [])
    if backend is not None:
        chosen = next((b for b in backends if b.name == backend), None)
        if chosen is None:
            raise ValueError(f"{op} has no backend {backend!r}; available: {available_backends(op)}")
        unmet = chosen.unmet({**call, "named": True})
        if unmet is not None:
            raise ValueError(f"{op}(backend={backend!r}) needs {unmet.what}; got {describe(call)}. "
                             f"Other backends: {[b for b in available_backends(op) if b != backend]}")
        return chosen.fn
    skipped: list[tuple[Backend, Requirement]] = []
    for b in backends:
        if not b.auto:
            continue
        unmet = b.unmet(call)
        if unmet is None:
            if b.name == "reference" and call["device"].type == "cuda" and skipped and not skipped[0][1].preference:
                _warn_reference_on_cuda(op, *skipped[0], call)
            return b.fn
        skipped.append((b, unmet))
    raise ValueError(f"{op}: no backend can run {describe(call)}: "
                     + "; ".join(f"{b.name!r} needs {r.what}" for b, r in skipped))


def empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The output of a call with no batch or no heads (B = 0 or heads = 0): an empty (B, heads, N, dv)
    tensor, what the reference returns, connected to q, k, v for autograd; None when there is work.
    The ops return it after the checks and the choice of backend, before calling the backend: the
    fused kernels' launch grids divide by B * heads."""
    if q.shape[0] and q.shape[1]:
        return None
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    if q.requires_grad or k.requires_grad or v.requires_grad:
        out = out + (q.sum() + k.sum() + v.sum()) * 0
    return out


def describe(facts: Facts) -> str:
    """The facts of a call, for an error message."""
    return ", ".join(f"{k}={v}" for k, v in facts.items())


def _warn_reference_on_cuda(op: str, faster: Backend, unmet: Requirement, facts: Facts) -> None:
    if torch.compiler.is_compiling() or (op, unmet.what) in _WARNED:      # warnings.warn cannot be traced
        return
    _WARNED.add((op, unmet.what))
    warnings.warn(f"{op} runs its PyTorch reference on CUDA (slow, memory-hungry): backend {faster.name!r} needs "
                  f"{unmet.what}; got {describe(facts)}", stacklevel=3)


# --- requirements shared by the ops ---------------------------------------------------------

def triton_device() -> Requirement:
    """A CUDA tensor; a CPU tensor too under the Triton interpreter when the backend is named (tests)."""
    return Requirement("a CUDA tensor (or TRITON_INTERPRET=1 and the backend named explicitly)",
                       lambda f: f["device"].type == "cuda" or (INTERPRET and f.get("named", False)))


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtypes(*allowed: torch.dtype) -> Requirement:
    names = [str(d).removeprefix("torch.") for d in allowed]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return Requirement(f"inputs in {listed}", lambda f: f["dtype"] in allowed)


def head_dim_at_most(limit: int, same_value_dim: bool = False) -> Requirement:
    if same_value_dim:
        return Requirement(f"head_dim <= {limit}, the same for q and v",
                           lambda f: f["head_dim"] <= limit and f["value_dim"] == f["head_dim"])
    return Requirement(f"head_dim <= {limit}", lambda f: f["head_dim"] <= limit)

