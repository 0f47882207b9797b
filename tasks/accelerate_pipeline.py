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
steps) stay dense. ``compare_pipeline`` runs a pipeline dense and accelerated from one seed and
reports the time and the fidelity (PSNR, SSIM, cosine similarity of the final latents).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import yaml
from diffusers import (DiffusionPipeline, DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, WanTransformer3DModel)
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor as DiffusersFluxAttnProcessor
from diffusers.models.transformers.transformer_wan import WanAttnProcessor as DiffusersWanAttnProcessor
from torch import nn

from .. import kernels
from .accelerate_pipeline_processors import (AttentionOp, FluxAttnProcessor, GridAttentionPolicy, JointAttnProcessor,
                                             SelfAttnProcessor, WanAttnProcessor, _SwappedProcessor)

# --- attention families ---------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A structured op that can replace dense attention without training."""

    op_name: str                                  # the op in subquad.kernels
    grid_dims: tuple[int, ...]                    # 2: image grids (H, W); 3: video grids (T, H, W)
    fits: Callable[[tuple[int, ...], dict], bool] = lambda grid, options: True
    options_list: str | None = None               # for an op taking **options: its list of names in kernels.functional


def _window_fits(grid: tuple[int, ...], options: dict) -> bool:
    return all(side >= options.get("kernel_size", 1) * options.get("dilation", 1) for side in grid)


FAMILIES: dict[str, Family] = {
    "neighborhood": Family("neighborhood_attention", (2,), _window_fits),
    "radial": Family("radial_attention", (2, 3), options_list="RADIAL_OPTIONS"),
    "loglinear": Family("loglinear_attention", (2,), options_list="LOGLINEAR_OPTIONS"),
    "agent": Family("agent_attention", (2,)),
}
FAMILY_ALIASES = {"nat": "neighborhood", "llsa": "loglinear"}


def _resolve_family(attn: str | AttentionOp, options: dict, grid_dims: int, transformer_name: str,
                    ) -> tuple[str, AttentionOp, Callable[[tuple[int, ...]], bool]]:
    """(name, op, fits) for a family name or a user op ``op(q, k, v, *, grid, num_prefix, **options)``."""
    if callable(attn):
        name, op, fits = getattr(attn, "__name__", repr(attn)), attn, (lambda grid, opts: True)
    else:
        name = FAMILY_ALIASES.get(attn, attn)
        if name not in FAMILIES:
            raise ValueError(f"unknown attention family {attn!r} for a pipeline; choose one of "
                             f"{', '.join(sorted(FAMILIES) + sorted(FAMILY_ALIASES))} (or pass an op)")
        family = FAMILIES[name]
        op = getattr(kernels, family.op_name, None)
        if op is None:
            available = [f for f, fam in FAMILIES.items() if hasattr(kernels, fam.op_name)]
            raise ValueError(f"attention family {name!r} needs subquad.kernels.{family.op_name}, which this build "
                             f"does not have; available: {', '.join(available)}")
        if grid_dims not in family.grid_dims:
            takes = [f for f, fam in FAMILIES.items() if grid_dims in fam.grid_dims]
            kind = "video grids (T, H, W)" if grid_dims == 3 else "image grids (H, W)"
            raise ValueError(f"{name} attention cannot take {transformer_name}'s {kind}; families that can: "
                             f"{', '.join(takes)}")
        fits = family.fits
        valid = getattr(kernels.functional, family.options_list, None) if family.options_list else None
        if valid is not None and set(options) - set(valid):
            raise ValueError(f"options {sorted(set(options) - set(valid))} do not fit {name}; its options: "
                             f"{', '.join(valid)}")
    probe = torch.zeros(1, 1, 1, 1)
    try:
        inspect.signature(op).bind(probe, probe, probe, grid=(1, 1), num_prefix=0, **options)
    except TypeError as e:
        raise ValueError(f"options {options} do not fit {name}: {e}") from None
    return name, op, lambda grid: fits(grid, options)


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
                 hooks: list[torch.utils.hooks.RemovableHandle], layers: dict[str, int]) -> None:
        self.policy, self.layers = policy, layers
        self._originals, self._hooks = originals, hooks

    def restore(self) -> None:
        """Put back the exact processor objects the transformer(s) had, and remove the grid hooks."""
        for module, processor in self._originals:
            module.set_processor(processor)
        for hook in self._hooks:
            hook.remove()
        self._originals, self._hooks = [], []

    def __enter__(self) -> AttentionSwap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def accelerate_pipeline(pipe: Any, attn: str | AttentionOp, *, dense_layers: Iterable[int] = (),
                        dense_steps: int = 0, **options: Any) -> AttentionSwap:
    """Swap the self-attention over the latent tokens of ``pipe``'s transformer(s) for ``attn``.

    ``pipe``: a diffusers pipeline (its ``transformer`` and ``transformer_2``) or a transformer.
    ``attn``: 'neighborhood' (alias 'nat'), 'radial', 'loglinear' (alias 'llsa') or 'agent', with
    the op's options as keywords (``kernel_size=`` for neighborhood, ``num_agents=`` for agent...);
    or any op ``op(q, k, v, *, grid, num_prefix, **options)`` on (B, heads, N, d).
    ``dense_layers``: block indices (in forward order; Flux counts its double-stream blocks first)
    that keep dense attention; ``dense_steps``: the first denoising steps stay dense.
    Every check runs before anything changes: on an error the pipeline is left as it was.
    """
    transformers = _transformers_of(pipe)
    dense_layers = sorted(set(int(i) for i in dense_layers))
    if dense_steps < 0:
        raise ValueError(f"dense_steps must be >= 0, got {dense_steps}")
    plans, family = [], None
    for transformer in transformers:
        spec = SUPPORTED[type(transformer)]
        family = _resolve_family(attn, options, spec.grid_dims, type(transformer).__name__)
        targets = _targets(transformer, spec)
        num_blocks = max((block for *_, block in targets), default=-1) + 1
        if any(not 0 <= i < num_blocks for i in dense_layers):
            raise ValueError(f"dense_layers {dense_layers} out of range: {type(transformer).__name__} has "
                             f"{num_blocks} blocks with self-attention (0..{num_blocks - 1})")
        plans.append((transformer, spec, targets))
    name, op, fits = family
    policy = GridAttentionPolicy(name, op, options, dense_layers, dense_steps, fits)
    originals, hooks, layers = [], [], {}
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
    return AttentionSwap(policy, originals, hooks, layers)


# --- speed and fidelity -------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = F.mse_loss(a.double(), b.double()).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al., 2004) of images (N, C, H, W) in [0, 1]; Gaussian window, per channel."""
    a, b = a.double(), b.double()
    window = min(window, a.shape[-2], a.shape[-1])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window)
    blur = lambda x: F.conv2d(x, kernel, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, each flattened per sample, averaged over the batch."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean().item()


@contextlib.contextmanager
def _decoder_inputs(vae: nn.Module):
    """Record the latents each ``vae.decode`` call receives (the sampler's final latents, scaled)."""
    seen: list[torch.Tensor] = []
    decode = vae.decode

    def recording(z: torch.Tensor, *args: Any, **kwargs: Any):
        seen.append(z.detach().float().cpu())
        return decode(z, *args, **kwargs)
    vae.decode = recording
    try:
        yield seen
    finally:
        del vae.decode


def _as_images(output: Any) -> torch.Tensor:
    """A pipeline's ``output_type='np'`` result, (B, H, W, C) or video (B, F, H, W, C), as (N, C, H, W)."""
    x = torch.as_tensor(output if not isinstance(output, list) else torch.stack([torch.as_tensor(o) for o in output]))
    return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float()


def run_pipeline(pipe: Any, call_kwargs: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One seeded pipeline call: (images (N, C, H, W) in [0, 1], final latents, seconds)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with _decoder_inputs(pipe.vae) as latents:
        out = pipe(**call_kwargs, generator=generator, output_type="np", return_dict=False)[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return _as_images(out), torch.cat(latents), seconds


def compare_pipeline(pipe: Any, call_kwargs: dict, attn: str | AttentionOp, *, seed: int = 0, warmup: int = 0,
                     dense_layers: Iterable[int] = (), dense_steps: int = 0,
                     **options: Any) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Run ``pipe(**call_kwargs)`` dense, then accelerated, from the same seed.

    Returns (report, dense images, accelerated images); the report has both times (after
    ``warmup`` untimed calls of each), the speedup, PSNR and SSIM of the accelerated images
    against the dense ones, and the cosine similarity of the final latents. The pipeline is
    restored before returning.
    """
    for _ in range(warmup):
        run_pipeline(pipe, call_kwargs, seed)
    dense, dense_latents, dense_s = run_pipeline(pipe, call_kwargs, seed)
    with accelerate_pipeline(pipe, attn, dense_layers=dense_layers, dense_steps=dense_steps, **options):
        for _ in range(warmup):
            run_pipeline(pipe, call_kwargs, seed)
        fast, fast_latents, fast_s = run_pipeline(pipe, call_kwargs, seed)
    report = {"dense_s": dense_s, "accelerated_s": fast_s, "speedup": dense_s / fast_s,
              "psnr_db": psnr(fast, dense), "ssim": ssim(fast, dense),
              "latent_cosine": cosine_similarity(fast_latents, dense_latents)}
    return report, dense, fast


# --- the command line -------------------------------------------------------------------------------

PIPELINE_ARGUMENTS = ("prompt", "negative_prompt", "class_labels", "height", "width", "num_frames",
                      "num_inference_steps", "guidance_scale")


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``["kernel_size=13", "layout=official"]`` -> ``{"kernel_size": 13, "layout": "official"}`` (values as YAML)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"an attention option is KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


def parse_indices(text: str | None) -> list[int]:
    """``"0,1,4-6"`` -> ``[0, 1, 4, 5, 6]``."""
    indices = []
    for part in filter(None, (text or "").split(",")):
        first, _, last = part.partition("-")
        indices += range(int(first), int(last or first) + 1)
    return indices


def pipeline_call_kwargs(pipe: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The given ``PIPELINE_ARGUMENTS`` values (None: not given), checked against ``pipe.__call__``."""
    accepted = inspect.signature(pipe.__call__).parameters
    given = {k: v for k, v in values.items() if v is not None}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(k for k in PIPELINE_ARGUMENTS if k in accepted)}")
    return given


def _save_images(images: torch.Tensor, path: Any) -> None:
    from torchvision.utils import save_image
    save_image(images, str(path), nrow=min(8, len(images)))


def run_accelerate_pipeline(args: Any) -> dict[str, Any]:
    """``subquad accelerate-pipeline``: a local pipeline dense vs accelerated (images, report.json), or
    with ``--random KIND`` one random-weight transformer call dense vs accelerated (speed only)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = parse_options(args.opt)
    swap = dict(dense_layers=parse_indices(args.dense_layers), **options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.random:
        from .accelerate_pipeline_random import benchmark_transformer
        report = benchmark_transformer(args.random, args.attn, size=args.size, height=args.height or 1024,
                                       width=args.width or 1024, num_frames=args.num_frames or 1, dtype=dtype,
                                       device=device, repeats=args.repeats, **swap)
    else:
        if args.model is None:
            raise ValueError("give --model <a local diffusers pipeline folder> (or --random KIND for a speed test)")
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        values = {k: getattr(args, k) for k in PIPELINE_ARGUMENTS}
        if values["class_labels"] is not None:
            values["class_labels"] = parse_indices(values["class_labels"])
        report, dense, fast = compare_pipeline(pipe, pipeline_call_kwargs(pipe, values), args.attn, seed=args.seed,
                                               warmup=args.warmup, dense_steps=args.dense_steps, **swap)
        _save_images(dense, out / "dense.png")
        _save_images(fast, out / "accelerated.png")
    report = {"attn": args.attn, "options": options, "dense_layers": swap["dense_layers"],
              "dense_steps": args.dense_steps, **report}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    for key, value in report.items():
        print(f"{key:>16}  {value:.4g}" if isinstance(value, float) else f"{key:>16}  {value}")
    return report
