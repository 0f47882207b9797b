"""Attention families by name: ``build("mala", dim=384, num_heads=6)``."""
from __future__ import annotations

import builtins
from typing import Callable

from torch import nn

_FAMILIES: dict[str, type[nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make an attention module buildable by ``name`` (and its aliases)."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        for n in (name, *aliases):
            if n in _FAMILIES or n in _ALIASES:
                raise ValueError(f"attention name {n!r} is registered twice")
        _FAMILIES[name] = cls
        _ALIASES.update({a: name for a in aliases})
        cls.family = name
        return cls
    return wrap


def canonical_name(name: str) -> str:
    """The family a name or alias stands for; ValueError listing the valid names otherwise."""
    if name in _FAMILIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ValueError(f"unknown attention family {name!r}; valid names: {', '.join(names(aliases=True))}")


def get(name: str) -> type[nn.Module]:
    return _FAMILIES[canonical_name(name)]


def build(name: str, **kwargs) -> nn.Module:
    """Build the attention module of family ``name`` with timm's Attention keywords plus family options."""
    return get(name)(**kwargs)


def names(aliases: bool = False) -> builtins.list[str]:
    """Every registered family (with ``aliases=True``, the aliases too), sorted."""
    return sorted(_FAMILIES) + (sorted(_ALIASES) if aliases else [])


def list() -> builtins.list[str]:  # noqa: A001 - the public name the interface promises
    """Every registered attention family."""
    return names()
