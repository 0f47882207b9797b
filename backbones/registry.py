"""Registering named models with timm: one entrypoint per model name, defined in the module that
holds the name's pretrained_cfg in its ``default_cfgs``."""
from __future__ import annotations

import sys
from typing import Any, Callable

from timm.models import register_model
from torch import nn


def register_variant(module: str, variant: str, create: Callable[..., nn.Module], doc: str) -> None:
    """Register the model ``variant`` with timm: ``timm.create_model(variant, **kwargs)`` calls
    ``create(variant, pretrained, **kwargs)``.

    The entrypoint is named ``variant``, documented by ``doc`` and set as an attribute of the module
    named ``module`` (pass ``__name__``), which timm records as the model's module and where it looks
    up ``default_cfgs[variant]``: define ``default_cfgs`` before registering.
    """
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = module
    entrypoint.__doc__ = doc
    setattr(sys.modules[module], variant, register_model(entrypoint))
