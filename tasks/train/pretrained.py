"""Fine-tuning: a timm model built with weights from a local checkpoint, checked before use.

Accepted checkpoints: a ``.safetensors`` state dict, a subquad run or checkpoint folder (its EMA
weights when it has them, else the model's), or a ``.pth``/``.pt``/``.bin`` file read with
``torch.load(weights_only=True)`` (no pickled code runs). Official weights pass through the model
module's ``checkpoint_filter_fn`` (timm's convention), so they load under our names.

The check runs on a copy of the model on the meta device, before anything is trained: every tensor
the model needs must be in the checkpoint with the right shape, and nothing else may be, except
the classifier, which is dropped (reset to random) when the class count differs. A checkpoint of
another model is a ``ValueError`` listing what does not fit (``subquad.backbones.pretrained``, which
also makes timm's ``pretrained_cfg_overlay=dict(file=...)`` strict); a missing file a ``FileNotFoundError``. The load itself is timm's
(``pretrained_cfg_overlay``), so it happens on the full model before a ``features_only`` wrapper
renames or prunes anything.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ...backbones.pretrained import check_state_dict, classifier_keys
from .checkpoint import find_latest, load_safetensors, read_tensors


def load_plain(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, no pickled code runs. A file
    it refuses (code in the pickle, not a torch file, truncated) is a ``ValueError`` naming ``what``, the file
    and the unpickler's reason in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # UnpicklingError, RuntimeError (zip), EOFError...: the reason is in the text
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split(". ")[0].splitlines()
        raise ValueError(f"{what} {path} is not plain weights that torch.load(weights_only=True) reads "
                         f"({reason[0] if reason else type(e).__name__})") from e


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
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = load_plain(path, "checkpoint")
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


def _checkpoint_filter(name: str):
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


def check_weights(name: str, kwargs: dict, state: dict[str, torch.Tensor], num_classes: int, source: str) -> int:
    """Raise a ``ValueError`` unless ``state`` fits model ``name``; return the checkpoint's class count.

    ``num_classes`` is the new model's (0 for a ``features_only`` backbone, which has no classifier).
    """
    with torch.device("meta"):          # the file in its config: the model files' filters name it in their errors
        model = timm.create_model(name, num_classes=num_classes, pretrained_cfg_overlay=dict(file=str(source)),
                                  **kwargs)
    filter_fn = _checkpoint_filter(name)
    state = filter_fn(dict(state), model) if filter_fn else dict(state)
    weight_key = next((k for k in sorted(classifier_keys(model)) if k.endswith(".weight") and k in state), None)
    check_state_dict(state, model, str(source))
    return state[weight_key].shape[0] if weight_key else 0


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
