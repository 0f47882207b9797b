"""Fine-tuning: a timm model built with weights from a local checkpoint, checked before use.

Accepted checkpoints: a ``.safetensors`` state dict, a subquad run or checkpoint folder (its EMA
weights when it has them, else the model's), or a ``.pth``/``.pt``/``.bin`` file read with
``torch.load(weights_only=True)`` (no pickled code runs). Official weights pass through the model
module's ``checkpoint_filter_fn`` (timm's convention), so they load under our names.

The check runs on a copy of the model on the meta device, before anything is trained: every tensor
the model needs must be in the checkpoint with the right shape, and nothing else may be, except
the classifier, which is dropped (reset to random) when the class count differs. A checkpoint of
another model is a ``ValueError`` listing what does not fit. The load itself is timm's
(``pretrained_cfg_overlay``), so it happens on the full model before a ``features_only`` wrapper
renames or prunes anything.
"""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import find_latest, read_tensors


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict stored at ``path`` (see the module docstring for the accepted forms)."""
    path = Path(path)
    if path.is_file() and (path.parent / "state.json").is_file():
        path = path.parent                                   # a file inside a subquad checkpoint folder
    if path.is_dir():
        folder = path if (path / "state.json").is_file() else find_latest(path)
        if folder is None:
            raise ValueError(f"{path} is a folder with no subquad checkpoint in it")
        tensors = read_tensors(folder)
        prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:      # the safe unpickler refuses anything but tensors and plain containers
            raise ValueError(f"{path} could not be read as plain weights (torch.load weights_only=True): {e}") from e
        for key in ("model", "state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    else:
        raise ValueError(f"checkpoint {path}: expected .safetensors, .pth, .pt, .bin or a subquad checkpoint folder")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def input_normalization(name: str) -> tuple[tuple, tuple]:
    """The (mean, std) model ``name`` expects; a clear error for a name timm does not know."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {name!r} (see `subquad models` or timm.list_models()); similar: {close}")
    cfg = timm.models.get_pretrained_cfg(name)
    return tuple(cfg.mean), tuple(cfg.std)


def _classifier_keys(model: nn.Module) -> set[str]:
    names = model.pretrained_cfg.get("classifier") or ()
    return {f"{n}.{s}" for n in ((names,) if isinstance(names, str) else names) for s in ("weight", "bias")}


def _checkpoint_filter(name: str):
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


def check_weights(name: str, kwargs: dict, state: dict[str, torch.Tensor], num_classes: int, source: str) -> int:
    """Raise a ``ValueError`` unless ``state`` fits model ``name``; return the checkpoint's class count.

    ``num_classes`` is the new model's (0 for a ``features_only`` backbone, which has no classifier).
    """
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    filter_fn = _checkpoint_filter(name)
    state = filter_fn(dict(state), model) if filter_fn else dict(state)
    head = _classifier_keys(model)
    weight_key = next((k for k in sorted(head) if k.endswith(".weight") and k in state), None)
    ckpt_classes = state[weight_key].shape[0] if weight_key else 0
    if ckpt_classes != num_classes:
        state = {k: v for k, v in state.items() if k not in head}
    own = model.state_dict()
    skip = head if ckpt_classes != num_classes else set()
    missing = [k for k in own if k not in state and k not in skip]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                 (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", wrong)) if v]
        raise ValueError(f"checkpoint {source} does not fit model {name}: {'; '.join(parts)}")
    return ckpt_classes


def create_model(name: str, kwargs: dict, num_classes: int, checkpoint: str | None = None,
                 features_only: bool = False, out_indices: list | None = None) -> nn.Module:
    """``timm.create_model`` with weights from a local ``checkpoint`` (checked first; head reset if needed)."""
    features = dict(features_only=True, **({"out_indices": tuple(out_indices)} if out_indices is not None else {})) \
        if features_only else {}
    num_classes = 0 if features_only else num_classes
    if checkpoint is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs, **features)
    state = read_weights(checkpoint)
    ckpt_classes = check_weights(name, kwargs, state, num_classes, checkpoint)
    if ckpt_classes != num_classes and not features_only:
        print(f"fine-tuning from {checkpoint}: classifier reset ({ckpt_classes} -> {num_classes} classes)")
    model = timm.create_model(name, num_classes=num_classes, pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=state, num_classes=ckpt_classes),
                              **kwargs, **features)
    for module in model.modules():          # timm keeps the overlay in pretrained_cfg: drop the weights' copy
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model
