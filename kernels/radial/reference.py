"""Radial attention, plain PyTorch: each query tile gathers the key tiles its plan lists."""
from __future__ import annotations

import torch

from ..core.gathered import append_global_keys, attend_gathered, gather_rows, mask_to_bias, with_global_prefix
from ..core.precision import compute_dtype
from ..core.tiles import from_tiles, to_tiles
from ..softmax import softmax_attention_reference
from .plan import radial_plan


def radial_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                               num_prefix: int, options: tuple) -> torch.Tensor:
    """Each query tile gathers its listed key tiles (and the prefix keys) and attends to them.

    Keys and values are cast to ``compute_dtype`` before they are gathered: a key tile listed by many
    query tiles then sums its gradient copies in float32, not in a 16-bit input dtype."""
    plan = radial_plan(grid, options, q.device)
    layout = plan.layout
    keep = (plan.key_tiles >= 0)[:, :, None] & layout.valid[plan.key_tiles.clamp_min(0)]   # (Q, L, t)
    dtype = compute_dtype(q)

    def attend_grid(qg, kg, vg, kp, vp):
        kg, vg, kp, vp = (x.to(dtype) for x in (kg, vg, kp, vp))
        q_t, k_t, v_t = (to_tiles(x, layout) for x in (qg, kg, vg))
        keys = gather_rows(k_t, plan.key_tiles).flatten(3, 4)                  # (B, h, Q, L*t, d)
        values = gather_rows(v_t, plan.key_tiles).flatten(3, 4)
        bias = mask_to_bias(keep.flatten(1))[:, None, :]                       # (Q, 1, L*t)
        keys, values, bias = append_global_keys(keys, values, bias, kp, vp)
        return from_tiles(attend_gathered(q_t, keys, values, bias), layout)

    return with_global_prefix(q, k, v, num_prefix, attend_grid, dense=softmax_attention_reference)
