"""Random-weight transformers and pipelines of every supported class, built from configs (no download).

``random_transformer(kind, size)``: ``size="tiny"`` for tests (a few thousand parameters, every
weight N(0, 0.3^2) so that no zero-initialised layer hides the attention), ``size="full"`` for
speed (the released models' configurations: DiT-XL/2, PixArt-Sigma, SD3-medium, FLUX.1-dev,
Wan2.1-T2V-14B; PyTorch's default init). ``transformer_inputs`` makes one call's inputs at a latent
size; ``tiny_pipeline(kind)`` a whole pipeline with tiny VAE and scheduler, fed prompt embeddings
instead of a text encoder; ``benchmark_transformer`` times one transformer call dense vs accelerated.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, AutoencoderKLWan, DDIMScheduler, DiTTransformer2DModel,
                       FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UniPCMultistepScheduler, WanTransformer3DModel)
from torch import nn
from tqdm import tqdm

from .accelerate import accelerate_pipeline
from .compare import cosine_similarity
from .families import AttentionOp

KINDS = ("dit", "pixart", "sd3", "flux", "wan")
_CLASSES = {"dit": DiTTransformer2DModel, "pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel,
            "flux": FluxTransformer2DModel, "wan": WanTransformer3DModel}
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "dit": {
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=10, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
        "full": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
    },
    "pixart": {
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=10, patch_size=2, cross_attention_dim=16, caption_channels=32,
                     norm_type="ada_norm_single", use_additional_conditions=False),
        "full": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=128, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                     norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=2),
    },
    "sd3": {
        "tiny": dict(sample_size=10, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                     pooled_projection_dim=16, pos_embed_max_size=16, dual_attention_layers=(0,)),
        "full": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    },
    "flux": {
        "tiny": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        "full": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    },
    "wan": {
        "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                     text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        "full": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6),
    },
}
TEXT_TOKENS = {"dit": 0, "pixart": 300, "sd3": 333, "flux": 512, "wan": 512}   # the released pipelines' lengths
VAE_SCALE = 8            # pixels per latent side in every full-size pipeline (Flux packs 2x2 latents per token)
# pixels per side of one call when none is given: 1024 at full size; for the tiny models 256, a 16x16 token grid
# (the largest SD3's tiny position table takes), on which every family's default options fit
DEFAULT_RESOLUTION = {"full": 1024, "tiny": 256}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_transformer(kind: str, size: str = "tiny", *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A random-weight transformer of ``kind`` (one of ``KINDS``), in eval mode."""
    if kind not in CONFIGS or size not in CONFIGS[kind]:
        raise ValueError(f"no {size!r} config for {kind!r}; kinds: {', '.join(KINDS)}; sizes: tiny, full")
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = _CLASSES[kind](**CONFIGS[kind][size])
    if size == "tiny":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model.eval()


def parameter_count(kind: str, size: str) -> int:
    """Parameters of ``random_transformer(kind, size)``, counted on the meta device (no memory, no init)."""
    if kind not in CONFIGS or size not in CONFIGS[kind]:
        raise ValueError(f"no {size!r} config for {kind!r}; kinds: {', '.join(KINDS)}; sizes: tiny, full")
    with torch.device("meta"):
        return sum(p.numel() for p in _CLASSES[kind](**CONFIGS[kind][size]).parameters())


def available_memory(device: str | torch.device) -> int:
    """Bytes that a new model can take on ``device``: free CUDA memory, or the memory the OS says is
    available (``MemAvailable``, capped by a cgroup limit where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def check_memory(kind: str, size: str, dtype: torch.dtype, device: str | torch.device) -> None:
    """A ValueError with the numbers when the weights of ``random_transformer(kind, size)`` alone do not fit
    in the memory available on ``device`` (a model that would start and then be killed, or swap for hours)."""
    params = parameter_count(kind, size)
    need, have = params * dtype.itemsize, available_memory(device)
    if need > have:
        where = "GPU memory free" if torch.device(device).type == "cuda" else "memory available"
        raise ValueError(f"the {size}-size {_CLASSES[kind].__name__} has {params / 1e9:.2f}B parameters: "
                         f"{need / 2 ** 30:.1f} GiB in {str(dtype).removeprefix('torch.')} for its weights alone, "
                         f"and this machine has {have / 2 ** 30:.1f} GiB of {where} on {device}; "
                         f"use --size tiny, or a machine with more memory")


def transformer_inputs(kind: str, transformer: nn.Module, *, latent_size: tuple[int, int], latent_frames: int = 1,
                       batch: int = 1, text_tokens: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for one call of ``transformer`` on latents of ``latent_size`` (H, W) at timestep 500."""
    cfg, p = transformer.config, next(transformer.parameters())
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(p.device, p.dtype)  # noqa: E731
    text = TEXT_TOKENS[kind] if text_tokens is None else text_tokens
    h, w = latent_size
    t = torch.full((batch,), 500.0, device=p.device)
    if kind == "dit":
        return dict(hidden_states=rand(batch, cfg.in_channels, h, w), timestep=t,
                    class_labels=torch.arange(batch, device=p.device) % cfg.num_embeds_ada_norm)
    if kind == "pixart":
        return dict(hidden_states=rand(batch, cfg.in_channels, h, w), timestep=t,
                    encoder_hidden_states=rand(batch, text, cfg.caption_channels),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if kind == "sd3":
        return dict(hidden_states=rand(batch, cfg.in_channels, h, w), timestep=t,
                    encoder_hidden_states=rand(batch, text, cfg.joint_attention_dim),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim))
    if kind == "flux":
        rows, cols = h // 2, w // 2
        ids = torch.zeros(rows, cols, 3, device=p.device, dtype=p.dtype)
        ids[..., 1] += torch.arange(rows, device=p.device)[:, None]
        ids[..., 2] += torch.arange(cols, device=p.device)[None, :]
        extra = {"guidance": torch.full((batch,), 3.5, device=p.device)} if cfg.guidance_embeds else {}
        return dict(hidden_states=rand(batch, rows * cols, cfg.in_channels), timestep=t / 1000,
                    encoder_hidden_states=rand(batch, text, cfg.joint_attention_dim),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), img_ids=ids.reshape(-1, 3),
                    txt_ids=torch.zeros(text, 3, device=p.device, dtype=p.dtype), **extra)
    if kind == "wan":
        return dict(hidden_states=rand(batch, cfg.in_channels, latent_frames, h, w), timestep=t,
                    encoder_hidden_states=rand(batch, text, cfg.text_dim))
    raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def pixel_inputs(kind: str, transformer: nn.Module, height: int, width: int, num_frames: int = 1,
                 batch: int = 1) -> dict[str, Any]:
    """``transformer_inputs`` for a call at a pixel resolution: 8 pixels per latent side, and for video
    (Wan) 4 frames per latent frame after the first, as the released VAEs."""
    frames = (num_frames - 1) // 4 + 1 if kind == "wan" else 1
    return transformer_inputs(kind, transformer, latent_size=(height // VAE_SCALE, width // VAE_SCALE),
                              latent_frames=frames, batch=batch)


def _tiny_vae(latent_channels: int, **config: Any) -> AutoencoderKL:
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=8, sample_size=80, **config).eval()


def tiny_pipeline(kind: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A tiny random pipeline of ``kind`` and the call keywords for 80x80 images: 10x10 latents, a 5x5
    token grid (Wan: 5 frames, a (2, 5, 5) grid). Text pipelines get prompt embeddings, no text encoder;
    they need the ``transformers`` package installed (diffusers' pipeline classes do)."""
    transformer = random_transformer(kind, seed=seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    text = 7
    if kind == "dit":
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=_tiny_vae(4), scheduler=DDIMScheduler())
        return pipe, dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=1.0)
    if kind == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(4),
                                             transformer=transformer, scheduler=DDIMScheduler())
        embeds = torch.randn(1, text, 32, generator=g)
        return pipe, dict(prompt_embeds=embeds, prompt_attention_mask=torch.ones(1, text), negative_prompt=None,
                          negative_prompt_embeds=torch.zeros_like(embeds),
                          negative_prompt_attention_mask=torch.ones(1, text), height=80, width=80,
                          num_inference_steps=3, guidance_scale=2.0, use_resolution_binning=False)
    if kind == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4, shift_factor=0.0),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None)
        embeds, pooled = torch.randn(1, text, 32, generator=g), torch.randn(1, 16, generator=g)
        return pipe, dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                          negative_prompt_embeds=torch.zeros_like(embeds),
                          negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=80, width=80,
                          num_inference_steps=3, guidance_scale=2.0)
    if kind == "flux":
        pipe = diffusers.FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4, shift_factor=0.0),
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer)
        return pipe, dict(prompt_embeds=torch.randn(1, text, 32, generator=g),
                          pooled_prompt_embeds=torch.randn(1, 16, generator=g), height=80, width=80,
                          num_inference_steps=3)
    if kind == "wan":
        vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                               latents_std=[1.0] * 4).eval()
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                                     scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                       use_flow_sigmas=True, flow_shift=3.0))
        embeds = torch.randn(1, text, 16, generator=g)
        return pipe, dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), height=80,
                          width=80, num_frames=5, num_inference_steps=3, guidance_scale=2.0)
    raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def _timed(fn) -> tuple[float, Any]:
    """(seconds, output) of one call of ``fn``, the device synchronised before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _median_s(fn, repeats: int) -> float:
    return statistics.median(_timed(fn)[0] for _ in range(repeats))


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    return _median_s(fn, repeats)


def skip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, ...],
                   num_prefix: int = 0) -> torch.Tensor:
    """An op that returns ``v`` in place of attention: a transformer call with it costs everything but the
    swapped attention, so dense time / its time bounds what any family can gain there (Amdahl)."""
    return v


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, ...],
                    num_prefix: int = 0) -> torch.Tensor:
    """Dense attention as a swapped op: a call with it costs what ``accelerate_pipeline`` gains around the attention
    (the fused blocks and q/k passes) with the attention itself left dense."""
    return F.scaled_dot_product_attention(q, k, v)


def time_call(transformer: nn.Module, inputs: dict[str, Any], repeats: int, attn: str | AttentionOp | None = None,
              dense_layers: Iterable[int] = (), **options: Any) -> tuple[float, torch.Tensor]:
    """Median seconds of one call of ``transformer`` on ``inputs`` (after a warm-up call) and its output:
    dense (``attn`` None), or with ``attn`` swapped in by ``accelerate_pipeline`` (restored after)."""
    call = lambda: transformer(**inputs, return_dict=False)[0]  # noqa: E731
    if attn is None:
        return _time(call, repeats), call()
    with accelerate_pipeline(transformer, attn, dense_layers=dense_layers, **options):
        return _time(call, repeats), call()


def denoise(transformer: nn.Module, inputs: dict[str, Any], steps: int, flux: bool = False,
            desc: str = "denoising") -> torch.Tensor:
    """``steps`` Euler steps of a rectified-flow sampler from the inputs' latents, timesteps 1000 -> 0 (Flux
    takes them / 1000): the calls and the latent updates of a pipeline's denoising loop, without the text
    encoders and the VAE, with a progress bar. Returns the final latents."""
    x = inputs["hidden_states"]
    times = torch.linspace(1000.0, 0.0, steps + 1, device=x.device)
    for t, t_next in tqdm(zip(times[:-1], times[1:]), total=steps, desc=desc, unit="step", leave=False):
        timestep = t.expand(x.shape[0]) / (1000 if flux else 1)
        out = transformer(**{**inputs, "hidden_states": x, "timestep": timestep}, return_dict=False)[0]
        velocity = out if flux else out[:, :x.shape[1]]          # DiT, PixArt: the variance channels after
        x = x + ((t_next - t) / 1000).to(x.dtype) * velocity
    return x


@torch.no_grad()
def benchmark_transformer(kind: str, attn: str | AttentionOp, *, size: str = "full", height: int | None = None,
                          width: int | None = None, num_frames: int = 1, batch: int = 1, repeats: int = 3,
                          dtype: torch.dtype = torch.bfloat16, device: str = "cuda", dense_layers: Iterable[int] = (),
                          compile: bool = False, steps: int = 0, dense_steps: int = 0,
                          **options: Any) -> dict[str, Any]:
    """One transformer call on random weights at a pixel resolution, dense vs accelerated.

    Pixels map to latents as in ``pixel_inputs``.
    Returns the token grid, the number of blocks with self-attention and of blocks fused (``blocks.py``), both
    median times, the speedup, the output cosine similarity, whether the family fell back to dense attention as
    slower (``fall_back_if_slower``) and the bound on any speedup: the call with the swapped attention skipped
    (``skip_attention``, the same dense layers kept), its time and dense time / that time; with ``compile`` also
    both under ``torch.compile(transformer)`` (``fullgraph`` but for Flux, whose grid is read from the values of
    ``img_ids``: one graph break), each with its compile time (the first call); with ``steps`` also end to end: a
    denoising loop of ``steps`` calls (``denoise``) from the same latents, dense and accelerated (its first
    ``dense_steps`` dense), both times, the speedup and the cosine similarity of the final latents. A model whose
    weights do not fit in the device's memory is refused first.
    """
    check_memory(kind, size, dtype, device)
    height, width = height or DEFAULT_RESOLUTION[size], width or DEFAULT_RESOLUTION[size]
    transformer = random_transformer(kind, size, dtype=dtype, device=device)
    inputs = pixel_inputs(kind, transformer, height, width, num_frames, batch)
    call = lambda: transformer(**inputs, return_dict=False)[0]  # noqa: E731
    compiled = torch.compile(transformer, fullgraph=kind != "flux") if compile else None
    compiled_call = lambda: compiled(**inputs, return_dict=False)[0]  # noqa: E731
    loop = lambda desc: denoise(transformer, inputs, steps, flux=kind == "flux", desc=desc)  # noqa: E731
    dense_s, dense = time_call(transformer, inputs, repeats)
    timed = {"dense": _compiled_time(compiled_call, repeats)} if compile else {}
    if steps:
        timed["dense_loop"] = _timed(lambda: loop("dense"))
    with accelerate_pipeline(transformer, attn, dense_layers=dense_layers, **options) as swap:
        fast_s, fast = _time(call, repeats), call()
        grid, blocks, fell_back = swap.policy.grid, len(set(swap.layers.values())), swap.policy.fell_back
        fused_blocks = len(swap.fused_blocks)
        if compile:
            timed["accelerated"] = _compiled_time(compiled_call, repeats)
    skipped_s = time_call(transformer, inputs, repeats, skip_attention, dense_layers, fall_back_if_slower=False)[0]
    if steps:
        with accelerate_pipeline(transformer, attn, dense_layers=dense_layers, dense_steps=dense_steps, **options):
            timed["accelerated_loop"] = _timed(lambda: loop("accelerated"))
    report = {"kind": kind, "size": size, "grid": grid, "tokens": int(torch.tensor(grid).prod()), "blocks": blocks,
              "fused_blocks": fused_blocks,
              "dense_ms": dense_s * 1e3, "accelerated_ms": fast_s * 1e3, "speedup": dense_s / fast_s,
              "output_cosine": cosine_similarity(fast.float(), dense.float()), "fell_back_to_dense": fell_back,
              "attention_skipped_ms": skipped_s * 1e3, "speedup_bound": dense_s / skipped_s}
    if steps:
        (dense_loop_s, dense_latents), (fast_loop_s, fast_latents) = timed["dense_loop"], timed["accelerated_loop"]
        report.update(steps=steps, dense_steps=dense_steps, end_to_end_dense_s=dense_loop_s,
                      end_to_end_accelerated_s=fast_loop_s, end_to_end_speedup=dense_loop_s / fast_loop_s,
                      latent_cosine=cosine_similarity(fast_latents.float(), dense_latents.float()))
    if compile:
        (dense_c, dense_compile_s, _), (fast_c, fast_compile_s, fast_out) = timed["dense"], timed["accelerated"]
        report.update(compiled_dense_ms=dense_c * 1e3, compiled_accelerated_ms=fast_c * 1e3,
                      compiled_speedup=dense_c / fast_c, dense_compile_s=dense_compile_s,
                      accelerated_compile_s=fast_compile_s,
                      compiled_output_cosine=cosine_similarity(fast_out.float(), dense.float()))
    return report


def _compiled_time(call, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(median seconds, seconds of the first call: the compile, its output) of a compiled call."""
    compile_s, out = _timed(call)
    return _median_s(call, repeats), compile_s, out
