"""``subquad bench --suite pipeline``: one transformer call of the released diffusers models' sizes (random
weights), dense against several attention swaps measured in the same run.

Per case (a transformer class at a pixel resolution): the dense call, the call with the swapped attention dense
(``dense_attention``: what the accelerator's fused blocks and q/k passes give alone), the call with the swapped
self-attention skipped (``skip_attention``: the bound on any speedup from attention alone, Amdahl), and each
swap's call with its speedup, a 50-step run's speedup from these calls' times (``end_to_end_speedup``: the first
5 steps dense, as ``dense_steps``), the cosine similarity of its output to the dense one and whether it ran dense
attention as the faster (``accelerate_pipeline``'s ``fall_back_if_slower``). Each transformer is
built once for all its cases. Cases: FLUX at 2048x2048 and Wan 2.1 14B at 480x832 (33 and 81 frames) and
720x1280 (81 frames), the sizes people wait on; for Wan the radial mask's layouts and decay factors side by
side (``frames``, subquad's default, at the video pipelines' default decay 0.2 and at the op's 1.0, and
``official``, the published mask, at the official Wan script's decay 0.2).
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from ..pipelines.accelerate import accelerate_pipeline
from ..pipelines.compare import cosine_similarity
from ..pipelines.random_models import dense_attention, pixel_inputs, random_transformer, skip_attention, time_call
from ..tables import format_table, save_csv

matplotlib.use("Agg")

Swap = tuple[str, dict[str, Any]]                 # (family, options)


@dataclass(frozen=True)
class PipelineCase:
    """One call of the ``kind`` transformer at ``height`` x ``width`` (x ``num_frames``), dense and with each swap."""
    kind: str
    height: int
    width: int
    num_frames: int
    swaps: tuple[Swap, ...]

    @property
    def label(self) -> str:
        frames = f"x{self.num_frames}" if self.kind == "wan" else ""
        return f"{self.kind} {self.height}x{self.width}{frames}"


_WAN_RADIAL: tuple[Swap, ...] = (("radial", {}), ("radial", {"decay_factor": 1.0}),
                                 ("radial", {"layout": "official", "decay_factor": 0.2}))
PIPELINE_CASES = (
    PipelineCase("flux", 2048, 2048, 1, (("radial", {}), ("radial", {"tile": (8, 16)}),
                                          ("neighborhood", {"kernel_size": 13}), ("neighborhood", {"kernel_size": 31}),
                                          ("loglinear", {}))),
    PipelineCase("wan", 480, 832, 33, _WAN_RADIAL),
    PipelineCase("wan", 480, 832, 81, _WAN_RADIAL),
    PipelineCase("wan", 720, 1280, 81, _WAN_RADIAL),
)
PIPELINE_COLUMNS = [("case", "case", "s"), ("tokens", "tokens", "d"), ("attention", "attention", "s"),
                    ("ms", "ms", ".1f"), ("speedup", "x dense", ".2f"), ("bound", "bound x", ".2f"),
                    ("end_to_end", "x dense, 50 steps", ".2f"), ("cosine", "output cosine", ".5f"),
                    ("fell_back", "ran dense (slower)", "")]
STEPS, DENSE_STEPS = 50, 5          # a sampling run of 50 steps whose first 10% keep dense attention (dense_steps)


def end_to_end_speedup(dense_s: float, dense_step_s: float, step_s: float) -> float:
    """A sampling run's speedup from one call's times (the run is ``STEPS`` such calls; the latent updates between
    them are negligible next to a call): dense throughout against ``DENSE_STEPS`` calls at ``dense_step_s`` (dense
    attention, the accelerator's fused blocks) and the rest at ``step_s``."""
    return STEPS * dense_s / (DENSE_STEPS * dense_step_s + (STEPS - DENSE_STEPS) * step_s)


def swap_label(family: str, options: dict[str, Any]) -> str:
    return " ".join([family, *(f"{k}={v}" for k, v in options.items())])


def _case_rows(model: torch.nn.Module, case: PipelineCase, repeats: int) -> list[dict]:
    inputs = pixel_inputs(case.kind, model, case.height, case.width, case.num_frames)
    dense_s, dense = time_call(model, inputs, repeats)
    skipped_s = time_call(model, inputs, repeats, skip_attention, fall_back_if_slower=False)[0]
    base = {"case": case.label}
    rows = [{**base, "tokens": 0, "attention": "dense", "ms": dense_s * 1e3, "speedup": 1.0,
             "bound": dense_s / skipped_s, "end_to_end": 1.0, "cosine": 1.0, "fell_back": False}]
    fused_s, fused = time_call(model, inputs, repeats, dense_attention, fall_back_if_slower=False)
    rows.append({**base, "tokens": 0, "attention": "dense, fused blocks", "ms": fused_s * 1e3,
                 "speedup": dense_s / fused_s, "bound": dense_s / skipped_s,
                 "end_to_end": end_to_end_speedup(dense_s, fused_s, fused_s),
                 "cosine": cosine_similarity(fused.float(), dense.float()), "fell_back": False})
    for family, options in case.swaps:
        with accelerate_pipeline(model, family, **options) as swap:
            seconds, out = time_call(model, inputs, repeats)
            tokens, fell_back = math.prod(swap.policy.grid), swap.policy.fell_back
        rows.append({**base, "tokens": tokens, "attention": swap_label(family, options), "ms": seconds * 1e3,
                     "speedup": dense_s / seconds, "bound": dense_s / skipped_s,
                     "end_to_end": end_to_end_speedup(dense_s, fused_s, seconds),
                     "cosine": cosine_similarity(out.float(), dense.float()), "fell_back": fell_back})
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    for row in rows[:2]:
        row["tokens"] = rows[-1]["tokens"]
    return rows


@torch.no_grad()
def bench_pipelines(cases: tuple[PipelineCase, ...] = PIPELINE_CASES, families: list[str] | None = None,
                    size: str = "full", repeats: int = 3, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                    csv_path: Path | None = None) -> list[dict]:
    """Rows per case: dense first (its ``bound``: dense time / the time with the attention skipped), then each
    swap (of ``families`` only, if given) with its speedup and output cosine. ``csv_path`` is rewritten after
    every case, so that an interrupted run keeps what it measured."""
    rows: list[dict] = []
    kinds = list(dict.fromkeys(c.kind for c in cases))
    for kind in kinds:
        model = random_transformer(kind, size, dtype=dtype, device=device)
        try:
            for case in tqdm([c for c in cases if c.kind == kind], desc=f"bench pipeline {kind}", unit="case"):
                swaps = tuple(s for s in case.swaps if not families or s[0] in families)
                rows += _case_rows(model, PipelineCase(case.kind, case.height, case.width, case.num_frames, swaps),
                                   repeats)
                if csv_path is not None:
                    save_csv(rows, csv_path)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def save_pipeline_plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per case: each swap's speedup over the dense call, and the bound (attention skipped)."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig = Figure(figsize=(4.8 * len(cases), 3.8))
    for ax, case in zip(fig.subplots(1, len(cases), squeeze=False)[0], cases):
        these = [r for r in rows if r["case"] == case and r["attention"] != "dense"]
        pos = list(range(len(these)))
        ax.barh(pos, [r["speedup"] for r in these], height=0.6)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="dense")
        ax.axvline(these[0]["bound"] if these else 1.0, color="red", linestyle=":", linewidth=1.5,
                   label="bound (attention skipped)")
        ax.set_yticks(pos, [r["attention"].replace(" ", "\n", 1) for r in these], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup over dense (one call)")
        ax.set_title(f"{case} ({these[0]['tokens'] if these else 0} tokens)", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def select_pipeline_cases(names: list[str] | None, cases: tuple[PipelineCase, ...] = PIPELINE_CASES
                          ) -> tuple[PipelineCase, ...]:
    """The cases whose label (e.g. ``wan 720x1280x81``) contains one of the substrings ``names`` (all for None)."""
    if not names:
        return cases
    picked = tuple(c for c in cases if any(name in c.label for name in names))
    if not picked:
        raise ValueError(f"no pipeline case matches {names}; the cases: {[c.label for c in cases]}")
    return picked


def run_pipeline_bench(out_dir: Path, families: list[str] | None = None, cases: list[str] | None = None
                       ) -> list[dict]:
    """Measure the cases (``select_pipeline_cases``), print the table, save ``bench_pipeline.csv`` and
    ``bench_pipeline.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_pipelines(select_pipeline_cases(cases), families=families, csv_path=out_dir / "bench_pipeline.csv")
    save_csv(rows, out_dir / "bench_pipeline.csv")
    save_pipeline_plot(rows, out_dir / "bench_pipeline.png",
                       f"subquad bench --suite pipeline: {torch.cuda.get_device_name()}, bf16, random weights at "
                       f"the released sizes, median of 3 calls")
    print(format_table(rows, PIPELINE_COLUMNS))
    print(f"saved {out_dir / 'bench_pipeline.csv'} and {out_dir / 'bench_pipeline.png'}")
    return rows
