"""The model zoo as a table: every subquad model with its family, parameters and GFLOPs."""
from __future__ import annotations

import timm
import torch
from timm.models import get_pretrained_cfg
from torch.utils.flop_counter import FlopCounterMode

from ..backbones import DiT


def subquad_model_names() -> list[str]:
    """Every timm model name that subquad registers (its model modules are named ``subquad_*``)."""
    return timm.list_models(module=[m for m in timm.list_modules() if m.startswith("subquad_")])


def count_model(name: str, **kwargs) -> dict:
    """Parameters and GFLOPs of ``name`` at its default input size, built on the meta device (no memory).

    GFLOPs follow the papers' convention: multiply-accumulates / 1e9 (fvcore counts the same way).
    """
    size = get_pretrained_cfg(name).input_size
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
        inputs = (torch.empty(1, *size),)
        if isinstance(model, DiT):
            inputs += (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    family = getattr(model, "attn_schedule", None)
    families = sorted(set(family.names)) if family is not None else []
    return {
        "model": name,
        "attention": "+".join(families),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 2e9,
        "input": f"{size[1]}x{size[2]}",
    }


def model_table() -> list[dict]:
    return [count_model(name) for name in subquad_model_names()]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` = [(key, header, format spec)]."""
    cells = [[format(r[k], f) if r[k] is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    left = [f == "s" for _, _, f in columns]
    line = lambda vals: "  ".join(v.ljust(w) if lj else v.rjust(w) for v, w, lj in zip(vals, widths, left)).rstrip()
    return "\n".join([line([h for _, h, _ in columns]), line(["-" * w for w in widths])] + [line(c) for c in cells])


MODEL_COLUMNS = [("model", "model", "s"), ("attention", "attention", "s"), ("params_m", "params (M)", ".2f"),
                 ("gflops", "GFLOPs", ".2f"), ("input", "input", "s")]
