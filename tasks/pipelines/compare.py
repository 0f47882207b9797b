"""A pipeline dense and accelerated from one seed: both times, and the fidelity of the accelerated
images to the dense ones (PSNR, SSIM) and of their final latents (cosine similarity)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .accelerate import accelerate_pipeline
from .families import AttentionOp


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
def _decoder_inputs(vae: nn.Module) -> Iterator[list[torch.Tensor]]:
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
