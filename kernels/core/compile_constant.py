"""Per-grid plans (tile layouts, index lists) as constants under ``torch.compile``.

The sparse families build, once per grid and options, index tensors whose sizes depend on data
(key lists, block hierarchies). Traced by dynamo, that building breaks the graph; marked
``torch.compiler.assume_constant_result``, it runs eagerly at trace time and its tensors enter the
graph as constants, so ``fullgraph=True`` captures the ops that use them. Dynamo does not resolve
the properties of a constant object, so a plan crosses the boundary as tensors and Python values in
tuples (``fields_of``) and is rebuilt into its dataclass in traced code.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable, TypeVar

import torch

Plan = TypeVar("Plan")


def static(value: object) -> object:
    """``value`` with its ints as Python ints and its lists as tuples, nested: under torch.compile
    a symbolic size (a recompile at a new grid makes sizes dynamic) is specialized, with a guard,
    and the value is hashable."""
    if isinstance(value, (tuple, list)):
        return tuple([static(v) for v in value])
    return operator.index(value) if isinstance(value, int) and not isinstance(value, bool) else value


def compile_constant(build: Callable[..., Plan]) -> Callable[..., Plan]:
    """``build`` cached per arguments (Python values such as grid, options and device, made
    ``static``) and a constant under ``torch.compile``: dynamo runs it eagerly instead of
    tracing it and takes the result as constants, so ``fullgraph=True`` captures its callers
    although what it builds has data-dependent sizes. Its result must depend on its arguments only
    and be tensors and Python values in tuples. It may raise (a check of options): under
    ``torch.compile`` the error surfaces wrapped in dynamo's, with the same message."""
    cached = functools.lru_cache(maxsize=128)(build)

    @torch.compiler.assume_constant_result
    def constant(*args: object, **kwargs: object) -> Plan:
        return cached(*args, **kwargs)

    @functools.wraps(build)
    def specialized(*args: object, **kwargs: object) -> Plan:
        if not torch.compiler.is_compiling():
            try:        # eager: hashable arguments go to the cache as they are (no per-call conversion)
                return cached(*args, **kwargs)
            except TypeError:       # a list among them (or a TypeError of the build, raised again below)
                pass
        return constant(*static(args), **{name: static(value) for name, value in kwargs.items()})

    return specialized


def fields_of(obj: object) -> tuple:
    """The fields of the dataclass instance ``obj`` in order, not copied (``dataclasses.astuple``
    copies tensors): ``type(obj)(*fields_of(obj))`` rebuilds it."""
    return tuple([getattr(obj, field.name) for field in dataclasses.fields(obj)])
