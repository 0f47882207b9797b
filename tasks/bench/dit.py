"""``subquad bench --suite dit``: a DiT's training step and sampling time per attention family,
against the same DiT with dense softmax (SDPA), measured in the same run (CUDA, random weights).

Cases: DiT-XL/2 on 512x512 images (64x64 latents: 32x32 = 1,024 tokens), DiT-XL/2 on 1024x1024
(128x128 latents: 4,096 tokens) and a pixel-space DiT-B/1 on 256x256 images (65,536 tokens, as the
LLSA paper trains). Training step: bf16 autocast forward, the noise-prediction MSE, backward and a
fused AdamW step on fp32 weights (median ms). Sampling: ``Sampler.sample`` (DDIM, classifier-free
guidance 4.0, so each step runs a batch of 2B) for ``SAMPLE_STEPS`` steps, seconds per call.
"""
from __future__ import annotations

import gc
from typing import Callable

import timm
import torch
from tqdm import tqdm

from ... import attention
from ..train.config import DiTModelConfig
from ..train.sample import Sampler
from .families import BASELINE
from .measure import median_ms

# (label, model name, latent side, channels, training batch)
DIT_CASES = [("DiT-XL/2 512px", "dit_xl_2", 64, 4, 8),
             ("DiT-XL/2 1024px", "dit_xl_2", 128, 4, 2),
             ("DiT-B/1 pixels 256px", "dit_b_1", 256, 3, 1)]
SAMPLE_STEPS = 10
NUM_CLASSES = 1000


def _train_step(model: torch.nn.Module, batch: int, side: int, channels: int,
                device: torch.device) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, channels, side, side, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t, y)[:, :channels]
        torch.nn.functional.mse_loss(out.float(), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _measure(family: str, name: str, side: int, channels: int, batch: int, repeats: int,
             device: torch.device) -> dict:
    with device:                            # initialised on the device: seconds, not a minute, for DiT-XL
        model = timm.create_model(name, input_size=side, in_channels=channels, num_classes=NUM_CLASSES, attn=family)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_ms = median_ms(_train_step(model, batch, side, channels, device), device, repeats, warmup=2)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        sampler = Sampler(model.eval(), None, DiTModelConfig(name=name))

        def sample() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                sampler.sample(list(range(batch)), steps=SAMPLE_STEPS, cfg_scale=4.0, batch_size=batch,
                               progress=False)
        sample_s = median_ms(sample, device, max(1, repeats // 3), warmup=1) / 1e3
        return dict(train_step_ms=train_ms, train_peak_gib=peak, sample_s=sample_s)
    except torch.cuda.OutOfMemoryError:
        tqdm.write(f"bench dit: {family} {name} at {side}: out of memory")
        nan = float("nan")
        return dict(train_step_ms=nan, train_peak_gib=nan, sample_s=nan)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_dit(families: list[str] | None = None, repeats: int = 5, cases: list[tuple] | None = None,
              device: str = "cuda") -> list[dict]:
    """One row per (case, family): training step ms, its peak memory (CUDA), sampling seconds, and
    the speedups over the softmax (SDPA) DiT of the same case. ``cases``: ``DIT_CASES`` by default."""
    dev = torch.device(device)
    families = [BASELINE] + [f for f in (families or attention.list()) if f != BASELINE]
    rows = []
    jobs = [(case, family) for case in (cases or DIT_CASES) for family in families]
    for (label, name, side, channels, batch), family in tqdm(jobs, desc="bench dit", unit="case"):
        patch = int(name.rsplit("_", 1)[1])
        rows.append(dict(case=label, family=family, batch=batch, tokens=(side // patch) ** 2,
                         sample_steps=SAMPLE_STEPS,
                         **_measure(family, name, side, channels, batch, repeats, dev)))
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    for r in rows:
        base = next(x for x in rows if x["case"] == r["case"] and x["family"] == BASELINE)
        r["speedup_train"] = base["train_step_ms"] / r["train_step_ms"]
        r["speedup_sample"] = base["sample_s"] / r["sample_s"]
    return rows
