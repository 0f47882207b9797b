"""Log-linear sparse attention, plain PyTorch with explicit index lists (the plan: ``plan.py``)."""
from __future__ import annotations

import torch

from ..core.gathered import append_global_keys, attend_gathered, gather_rows, mask_to_bias, with_global_prefix
from ..core.tiles import from_tiles, to_tiles
from ..softmax import softmax_attention_reference
from .plan import block_hierarchy, pool_levels, select_blocks


def loglinear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                                  num_prefix: int, side: int, top_k: tuple[int, ...]) -> torch.Tensor:
    """Each finest query block attends to its selected blocks' tokens, the pooled tokens of its
    candidates at every level (weighted by their token counts) and the prefix keys."""
    hierarchy = block_hierarchy(grid, side, len(top_k), q.device)
    tiles = hierarchy.layouts[0]

    def attend_grid(qg, kg, vg, kp, vp):
        pooled = [pool_levels(x, hierarchy) for x in (qg, kg, vg)]
        selection = select_blocks(pooled[0], pooled[1], hierarchy, top_k)
        fine = selection.selected[0]                                             # (B, h, n_1, K_1)
        keys = [gather_rows(to_tiles(kg, tiles), fine).flatten(3, 4)]
        values = [gather_rows(to_tiles(vg, tiles), fine).flatten(3, 4)]
        bias = [mask_to_bias(((fine >= 0)[..., None] & tiles.valid[fine.clamp_min(0)]).flatten(3))]
        for level, cand in enumerate(selection.candidates):
            cand = cand[:, :, hierarchy.group_of_finest(level)]                  # per finest block
            keys.append(gather_rows(pooled[1][level], cand))
            values.append(gather_rows(pooled[2][level], cand))
            weight = hierarchy.counts[level].float().log()[cand.clamp_min(0)]
            bias.append(weight.masked_fill(cand < 0, float("-inf")))
        n1 = fine.shape[2]
        expand = lambda t: t.expand(*qg.shape[:2], n1, *t.shape[3:])             # noqa: E731
        keys, values = torch.cat([expand(t) for t in keys], 3), torch.cat([expand(t) for t in values], 3)
        bias = torch.cat([expand(b) for b in bias], -1)[..., None, :]            # (B, h, n_1, 1, M)
        keys, values, bias = append_global_keys(keys, values, bias, kp, vp)
        return from_tiles(attend_gathered(to_tiles(qg, tiles), keys, values, bias), tiles)

    return with_global_prefix(q, k, v, num_prefix, attend_grid, dense=softmax_attention_reference)
