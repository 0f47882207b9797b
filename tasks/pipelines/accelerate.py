"""Accelerate an existing diffusers pipeline: structured attention over its image (or video) tokens.

    handle = subquad.accelerate_pipeline(pipe, attn="neighborhood", kernel_size=13, dense_steps=2)
    images = pipe(prompt, height=1024, width=1024).images
    handle.restore()                     # the exact original processors are back

The self-attention over the latent tokens of the pipeline's transformer(s) gets subquad's op of
the chosen family; text or conditioning tokens that share the sequence (SD3, Flux) are the op's
dense prefix tokens, and cross-attention stays as it is. The latent token grid is read from each
transformer call (the latents' shape over the patch size, or Flux's image ids), so any resolution
the pipeline is called with works. As the radial- and neighborhood-attention papers do for
training-free use, ``dense_layers`` (block indices) and ``dense_steps`` (the first denoising
steps) stay dense. The families a pipeline takes by name are in ``families.py``; ``compare.py`` runs
a pipeline dense and accelerated from one seed and reports the time and the fidelity.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel,
                       WanTransformer3DModel)
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor as DiffusersFluxAttnProcessor
from diffusers.models.transformers.transformer_wan import WanAttnProcessor as DiffusersWanAttnProcessor
from torch import nn

from ... import kernels
from ...kernels import checks
from ...kernels.core.family import check_options
from .blocks import fuse_blocks, unfuse_blocks
from .families import AttentionOp, pipeline_options, resolve_family
from .processors import (FluxAttnProcessor, GridAttentionPolicy, JointAttnProcessor, SelfAttnProcessor,
                         WanAttnProcessor, _SwappedProcessor)


# --- transformer classes ----------------------------------------------------------------------


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments


def _patch_grid(module: nn.Module, latents: torch.Tensor, patch: Sequence[int]) -> tuple[int, ...]:
    sides = tuple(latents.shape[2:])
    if len(sides) != len(patch) or any(s % p for s, p in zip(sides, patch)):
        raise ValueError(f"cannot infer the token grid of {type(module).__name__}: latents of shape "
                         f"{tuple(latents.shape)} with patch size {tuple(patch)}")
    return tuple(s // p for s, p in zip(sides, patch))


def _image_grid(module: nn.Module, call: dict) -> tuple[int, ...]:
    p = module.config.patch_size
    return _patch_grid(module, call["hidden_states"], (p, p))


def _video_grid(module: nn.Module, call: dict) -> tuple[int, ...]:
    return _patch_grid(module, call["hidden_states"], tuple(module.config.patch_size))


@torch.compiler.disable      # reads img_ids' values: run eagerly, one graph break in a compiled Flux transformer
def _flux_grid(module: nn.Module, call: dict) -> tuple[int, ...]:
    """Flux packs 2x2 latent patches into tokens; ``img_ids`` (N, 3) hold (0, row, col) in raster order."""
    ids = call.get("img_ids")
    if ids is None:
        raise ValueError("cannot infer the token grid of FluxTransformer2DModel: it was called without img_ids")
    ids = ids[0] if ids.dim() == 3 else ids
    n = ids.shape[0]
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    width = int(cols.max()) + 1 if n else 0
    index = torch.arange(n, device=ids.device)
    if n == 0 or (ids[:, 0] != 0).any() or not (rows == index // width).all() or not (cols == index % width).all():
        raise ValueError("cannot infer the token grid of FluxTransformer2DModel: its img_ids are not one raster grid "
                         "of (0, row, col) (reference-image tokens, as in Kontext, are not supported)")
    return n // width, width


@dataclass(frozen=True)
class TransformerSpec:
    """Which attention layers of a transformer class to swap, with what, and how to read its grid."""

    pattern: str                                  # names of the attention modules to swap (a regex)
    original: type                                # the diffusers processor they must be running
    processor: type[_SwappedProcessor]            # ours, mirroring it
    grid: Callable[[nn.Module, dict], tuple[int, ...]]
    grid_dims: int


SUPPORTED: dict[type, TransformerSpec] = {
    DiTTransformer2DModel: TransformerSpec(r".*\.attn1", AttnProcessor2_0, SelfAttnProcessor, _image_grid, 2),
    PixArtTransformer2DModel: TransformerSpec(r".*\.attn1", AttnProcessor2_0, SelfAttnProcessor, _image_grid, 2),
    SD3Transformer2DModel: TransformerSpec(r".*\.attn2?", JointAttnProcessor2_0, JointAttnProcessor, _image_grid, 2),
    FluxTransformer2DModel: TransformerSpec(r".*\.attn", DiffusersFluxAttnProcessor, FluxAttnProcessor, _flux_grid, 2),
    WanTransformer3DModel: TransformerSpec(r".*\.attn1", DiffusersWanAttnProcessor, WanAttnProcessor, _video_grid, 3),
}
TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")


def supported_transformers() -> list[str]:
    return sorted(cls.__name__ for cls in SUPPORTED)


def _transformers_of(pipe: Any) -> list[nn.Module]:
    if isinstance(pipe, nn.Module):
        found = [pipe]
    else:
        found = [getattr(pipe, a) for a in TRANSFORMER_ATTRIBUTES if getattr(pipe, a, None) is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer to accelerate; supported transformer classes: "
                         f"{', '.join(supported_transformers())}")
    for t in found:
        if type(t) not in SUPPORTED:
            raise ValueError(f"{type(pipe).__name__}'s transformer is a {type(t).__name__}, which subquad cannot "
                             f"accelerate; supported: {', '.join(supported_transformers())}")
    return found


def _targets(transformer: nn.Module, spec: TransformerSpec) -> list[tuple[str, nn.Module, int]]:
    """(name, attention module, block index) per layer to swap, in forward order."""
    found, blocks = [], {}
    for name, module in transformer.named_modules():
        if not hasattr(module, "set_processor") or not re.fullmatch(spec.pattern, name):
            continue
        proc = module.processor
        if isinstance(proc, _SwappedProcessor):
            raise ValueError(f"{type(transformer).__name__} is already accelerated; restore() it first")
        if type(proc) is not spec.original:
            raise ValueError(f"{name} of {type(transformer).__name__} runs {type(proc).__name__}; subquad replaces "
                             f"only diffusers' {spec.original.__name__} (set it back with set_attn_processor first)")
        if getattr(proc, "_parallel_config", None) is not None:
            raise ValueError(f"{name} runs context parallel attention, which subquad's ops do not support")
        if getattr(module, "spatial_norm", None) is not None or getattr(module, "group_norm", None) is not None:
            raise ValueError(f"{name} has a spatial or group norm, which subquad's processors do not implement")
        found.append((name, module, blocks.setdefault(name.rsplit(".", 1)[0], len(blocks))))
    return found


# --- the swap -----------------------------------------------------------------------------------


class AttentionSwap:
    """What ``accelerate_pipeline`` changed, and the way back: ``restore()`` (or leave a ``with`` block)."""

    def __init__(self, policy: GridAttentionPolicy, originals: list[tuple[nn.Module, object]],
                 hooks: list[torch.utils.hooks.RemovableHandle], layers: dict[str, int],
                 fused_blocks: list[nn.Module]) -> None:
        self.policy, self.layers, self.fused_blocks = policy, layers, fused_blocks
        self._originals, self._hooks = originals, hooks

    def restore(self) -> None:
        """Put back the exact processor objects the transformer(s) had and the blocks' own forwards, and remove the
        grid hooks."""
        for module, processor in self._originals:
            module.set_processor(processor)
        for hook in self._hooks:
            hook.remove()
        unfuse_blocks(self.fused_blocks)
        self._originals, self._hooks, self.fused_blocks = [], [], []

    def __enter__(self) -> AttentionSwap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def accelerate_pipeline(pipe: Any, attn: str | AttentionOp, *, dense_layers: Iterable[int] = (),
                        dense_steps: int = 0, fall_back_if_slower: bool = True, fused_blocks: bool = True,
                        **options: Any) -> AttentionSwap:
    """Swap the self-attention over the latent tokens of ``pipe``'s transformer(s) for ``attn``.

    ``pipe``: a diffusers pipeline (its ``transformer`` and ``transformer_2``) or a transformer.
    ``attn``: a family that replaces dense attention without training, by name or alias
    (``families.pipeline_families()``, e.g. 'neighborhood' or 'nat'), with its op's options as keywords
    (``kernel_size=`` for neighborhood, ``num_agents=`` for agent...); or any op
    ``op(q, k, v, *, grid, num_prefix, **options)`` on (B, heads, N, d). On video transformers (Wan) a family's
    ``families.VIDEO_DEFAULTS`` fill the options not given (radial: ``decay_factor=0.2``).
    ``dense_layers``: block indices (in forward order; Flux counts its double-stream blocks first)
    that keep dense attention; ``dense_steps``: the first denoising steps stay dense.
    ``fall_back_if_slower``: on a CUDA device (outside ``torch.compile``), the op is timed against dense
    attention on the first call of each token grid, and where it is slower the layers run dense attention
    (a warning says so; ``swap.policy.measured`` keeps the times).
    ``fused_blocks``: FLUX's, SD3's and Wan's blocks also run their adaLN modulation, gates and residual adds as fused
    passes (``blocks.py``; diffusers' values up to rounding order; ``swap.fused_blocks`` lists them).
    Every check runs before anything changes: on an error the pipeline is left as it was; the values of
    a named family's options are checked here (``Family.check``), not at the first denoising step.
    """
    transformers = _transformers_of(pipe)
    try:
        if isinstance(dense_layers, str):       # "0,1" would be iterated by character
            raise TypeError
        dense_layers = sorted(set(checks.check_int(i, "dense_layers", minimum=0) for i in dense_layers))
    except TypeError:
        raise ValueError(f"dense_layers must be an iterable of block indices (ints >= 0), got {dense_layers!r}") from None
    dense_steps = checks.check_int(dense_steps, "dense_steps", minimum=0)
    plans, family = [], None
    for transformer in transformers:
        spec = SUPPORTED[type(transformer)]
        options = pipeline_options(attn, options, spec.grid_dims)
        family = resolve_family(attn, options, spec.grid_dims, type(transformer).__name__)
        if not callable(attn):
            check_options(kernels.family(family[0]), options, "accelerate_pipeline")
        targets = _targets(transformer, spec)
        num_blocks = max((block for *_, block in targets), default=-1) + 1
        if any(not 0 <= i < num_blocks for i in dense_layers):
            raise ValueError(f"dense_layers {dense_layers} out of range: {type(transformer).__name__} has "
                             f"{num_blocks} blocks with self-attention (0..{num_blocks - 1})")
        plans.append((transformer, spec, targets))
    name, op, fits = family
    fall_back = checks.check_bool(fall_back_if_slower, "fall_back_if_slower", "accelerate_pipeline")
    fuse = checks.check_bool(fused_blocks, "fused_blocks", "accelerate_pipeline")
    policy = GridAttentionPolicy(name, op, options, dense_layers, dense_steps, fits, fall_back)
    originals, hooks, layers, blocks = [], [], {}, []
    for index, (transformer, spec, targets) in enumerate(plans):
        prefix = f"{TRANSFORMER_ATTRIBUTES[index]}." if len(plans) > 1 else ""
        for module_name, module, block in targets:
            originals.append((module, module.processor))
            module.set_processor(spec.processor(policy, block, module.processor))
            layers[prefix + module_name] = block

        def observe(module: nn.Module, args: tuple, kwargs: dict, spec: TransformerSpec = spec) -> None:
            call = _call_arguments(module, args, kwargs)
            policy.observe(spec.grid(module, call), call.get("timestep"))
        hooks.append(transformer.register_forward_pre_hook(observe, with_kwargs=True))
        if fuse:
            blocks += fuse_blocks(transformer)
    return AttentionSwap(policy, originals, hooks, layers, blocks)
