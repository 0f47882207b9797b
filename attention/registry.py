"""Attention modules by name: ``build("mala", dim=384, num_heads=6)``.

The families' names and aliases are their records' (``subquad.kernels.families()``). A few modules
are no kernel family (Swin's shifted windows, MAViT's RoPE softmax blocks): they are registered
apart as standalone modules, built by name the same way, and not listed among the families.
"""
from __future__ import annotations

import builtins
import inspect
from typing import Callable

from torch import nn

from ..kernels import available_backends, families, family
from ..kernels.core.dispatch import backend_names

_MODULES: dict[str, type[nn.Module]] = {}
_STANDALONE: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: the attention module of the family ``name`` (buildable by its name and aliases)."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        record = family(name)
        if record.name != name:
            raise ValueError(f"register the module under the family's name {record.name!r}, not {name!r}")
        if name in _MODULES:
            raise ValueError(f"attention family {name!r} has a module already: {_MODULES[name].__name__}")
        _MODULES[name] = cls
        cls.family = name
        return cls
    return wrap


def register_standalone(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: an attention module that is no kernel family, buildable by ``name``."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _STANDALONE or any(name in record.names for record in families()):
            raise ValueError(f"attention name {name!r} is taken")
        _STANDALONE[name] = cls
        cls.family = name
        return cls
    return wrap


def module_options(cls: type[nn.Module]) -> tuple[str, ...]:
    """The keywords an attention module class takes: its own (its family's options among them), then those
    of the classes it derives from (timm Attention's)."""
    names: builtins.list[str] = []
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
    return tuple(names)


def module_backends(cls: type[nn.Module]) -> builtins.list[str]:
    """The backend names a module of ``cls`` may be given: its family op's; for a standalone module, any op's."""
    record = next((f for f in families() if f.name == getattr(cls, "family", None)), None)
    return available_backends(record.op) if record is not None else backend_names()


def canonical_name(name: str) -> str:
    """The family (or standalone module) a name or alias stands for; ValueError listing the valid names otherwise."""
    if isinstance(name, str) and name in _STANDALONE:
        return name
    record = next((f for f in families() if name in f.names), None)
    if record is None or record.name not in _MODULES:
        raise ValueError(f"unknown attention family {name!r}; valid names: "
                         f"{', '.join(names(aliases=True) + standalone_names())}")
    return record.name


def get(name: str) -> type[nn.Module]:
    name = canonical_name(name)
    return _STANDALONE[name] if name in _STANDALONE else _MODULES[name]


def build(name: str, **kwargs) -> nn.Module:
    """Build the attention module ``name`` with timm's Attention keywords plus its options."""
    return get(name)(**kwargs)


def names(aliases: bool = False) -> builtins.list[str]:
    """Every family with a module (with ``aliases=True``, their aliases too), sorted."""
    return sorted(_MODULES) + (sorted(a for n in _MODULES for a in family(n).aliases) if aliases else [])


def standalone_names() -> builtins.list[str]:
    """The standalone modules (no kernel family), sorted."""
    return sorted(_STANDALONE)


def list() -> builtins.list[str]:  # noqa: A001 - the public name the interface promises
    """Every registered attention family."""
    return names()
