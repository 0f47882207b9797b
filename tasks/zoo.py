"""The model zoo and the attention families as tables: every subquad model with its families, parameters
and GFLOPs (``subquad models``); every family record with its aliases, paper, cost and grids
(``subquad families``).

Counting a model's FLOPs runs it on the meta device (about a second each), so ``subquad models`` reads the
counts from ``model_counts.csv`` beside this file; ``python -m subquad.tasks.zoo`` recounts every model and
rewrites it (the tests check each row against a fresh count).
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Iterator

import timm
import torch
from timm.models import get_pretrained_cfg, model_entrypoint
from torch.utils.flop_counter import FlopCounterMode

from .. import backbones, kernels
from ..backbones import DiT
from .tables import Column, save_csv

MODEL_COUNTS = Path(__file__).with_name("model_counts.csv")


def subquad_model_names() -> list[str]:
    """Every timm model name that subquad registers (its entrypoint is defined in ``subquad.backbones``)."""
    return [name for name in timm.list_models()
            if model_entrypoint(name).__module__.startswith(f"{backbones.__name__}.")]


# images per counted call: enough that the parameters' resized maps are small next to the activations and kept
# (``attention.base.small_next_to_activations``), as they are in any batched use
COUNTED_BATCH = 64


def count_model(name: str, img_size: int | None = None, **kwargs) -> dict:
    """Parameters and GFLOPs of ``name`` at its default input size (or ``img_size`` square), built on the
    meta device (no memory).

    GFLOPs follow the papers' convention: multiply-accumulates / 1e9 (fvcore counts the same way) per image of an
    inference call, without what is computed from the parameters alone and kept for inference (an agent
    block's resized biases): counted over a batch of ``COUNTED_BATCH`` images, beside which every block keeps them.
    """
    size = get_pretrained_cfg(name).input_size
    if img_size is not None and img_size != size[-1]:
        size, kwargs = (size[0], img_size, img_size), dict(kwargs, img_size=img_size)
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
        inputs = (torch.empty(COUNTED_BATCH, *size),)
        if isinstance(model, DiT):
            inputs += (torch.zeros(COUNTED_BATCH, dtype=torch.long), torch.zeros(COUNTED_BATCH, dtype=torch.long))
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")       # a family's note that it runs dense on this grid: not news here
        model(*inputs)                        # values of the parameters alone (resized bias maps) kept, not counted
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    family = getattr(model, "attn_schedule", None)
    families = sorted(set(family.names)) if family is not None else []
    return {
        "model": name,
        "attention": "+".join(families),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 2e9 / COUNTED_BATCH,
        "input": f"{size[1]}x{size[2]}",
    }


def committed_counts() -> dict[str, dict]:
    """The rows of ``model_counts.csv`` by model name (numbers as floats)."""
    with open(MODEL_COUNTS, newline="") as f:
        return {r["model"]: {**r, "params_m": float(r["params_m"]), "gflops": float(r["gflops"])}
                for r in csv.DictReader(f)}


def model_rows(recount: bool = False) -> Iterator[dict]:
    """One row per subquad model, in name order: from ``model_counts.csv``, counted afresh when ``recount``
    or when the file has no row for it."""
    committed = {} if recount else committed_counts()
    for name in subquad_model_names():
        yield committed.get(name) or count_model(name)


def write_model_counts(path: Path = MODEL_COUNTS) -> None:
    """Count every subquad model and write the table read by ``subquad models``."""
    rows = [{**r, "params_m": f"{r['params_m']:.6f}", "gflops": f"{r['gflops']:.4f}"} for r in model_rows(recount=True)]
    save_csv(rows, path)


MODEL_COLUMNS: list[Column] = [("model", "model", "s"), ("attention", "attention", "s"),
                               ("params_m", "params (M)", ".2f"), ("gflops", "GFLOPs", ".2f"), ("input", "input", "s")]


def family_table() -> list[dict]:
    """One row per attention family record, in table order."""
    return [{"family": r.name, "aliases": ", ".join(r.aliases), "attention": r.title, "paper": r.paper, "cost": r.cost,
             "grids": " ".join({2: "2D", 3: "3D"}.get(n, f"{n}D") for n in r.grid_ranks),
             "pipeline": "yes" if r.training_free else "no"}
            for r in kernels.families()]


FAMILY_COLUMNS: list[Column] = [("family", "family", "s"), ("aliases", "aliases", "s"), ("attention", "attention", "s"),
                                ("paper", "paper", "s"), ("cost", "cost", "s"), ("grids", "grids", "s"),
                                ("pipeline", "training-free", "s")]


if __name__ == "__main__":
    write_model_counts()
    print(f"wrote {MODEL_COUNTS}")
