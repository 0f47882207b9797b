"""Strict loading of local checkpoints into every subquad model.

``timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))``
goes through timm's ``load_pretrained``, which turns strict loading off whenever the class count
differs from the pretrained config's: a checkpoint of another model would then load in part, the
rest left random, without a word. ``build_with_pretrained`` wraps ``build_model_with_cfg`` so that

- a ``file`` that does not exist is a ``FileNotFoundError`` naming it (timm's has no message);
- after the model's ``checkpoint_filter_fn``, every tensor of the model must be in the checkpoint
  with its shape, and nothing else may be; only the classifier (``pretrained_cfg['classifier']``)
  may be missing, extra or of another size (timm resets it when the class count differs). Anything
  else is a ``ValueError`` naming the keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

SHOWN = 10                  # keys listed per kind of mismatch


def classifier_keys(model: nn.Module) -> set[str]:
    """The parameter names of the classifier that ``model.pretrained_cfg`` names (weight and bias)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return {f"{n}.{s}" for n in ((names,) if isinstance(names, str) else names) for s in ("weight", "bias")}


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"{keys[:SHOWN]}{more}"


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str | None = None,
                     converted_from: str | None = None) -> dict[str, torch.Tensor]:
    """``state_dict`` unchanged if it fits ``model`` exactly (the classifier aside), else a ``ValueError``
    naming the missing and unexpected keys and the shape mismatches.

    ``source``: what to call the checkpoint (default: the pretrained config's ``file``);
    ``converted_from``: the official layout a filter also reads, for the message. A first-conv weight
    that differs only in its input channels passes (timm adapts it to ``in_chans``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own, head = model.state_dict(), classifier_keys(model)
    first_conv = cfg.get("first_conv")
    first_convs = {f"{n}.weight" for n in ((first_conv,) if isinstance(first_conv, str) else first_conv or ())}
    missing = [k for k in own if k not in state_dict and k not in head]
    unexpected = [k for k in state_dict if k not in own and k not in head]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and k not in head and v.shape != own[k].shape
             and not (k in first_convs and v.shape[:1] + v.shape[2:] == own[k].shape[:1] + own[k].shape[2:])]
    if missing or unexpected or wrong:
        parts = [f"{what} ({len(keys)}): {_listed(keys)}" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("shape mismatches (checkpoint vs model)", wrong)) if keys]
        name = source or cfg.get("file") or "the state dict"
        converted = f" (read in our layout or {converted_from})" if converted_from else ""
        model_name = cfg.get("architecture", type(model).__name__)
        raise ValueError(f"checkpoint {name}{converted} does not fit model {model_name}: {'; '.join(parts)}")
    return dict(state_dict)


def strict_filter(filter_fn: Callable | None) -> Callable:
    """``filter_fn`` (a model file's ``checkpoint_filter_fn``, or None) followed by ``check_state_dict``."""
    def apply(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return check_state_dict(filter_fn(state_dict, model) if filter_fn else state_dict, model)
    return apply


def build_with_pretrained(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable | None = None,
                          **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` whose pretrained load is strict (see the module docstring)."""
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
        if cfg.file and not Path(cfg.file).is_file():
            raise FileNotFoundError(f"pretrained checkpoint {cfg.file} (pretrained_cfg_overlay file) does not exist")
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=strict_filter(filter_fn),
                                **kwargs)
