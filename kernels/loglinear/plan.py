"""Log-linear sparse attention (LLSA; Zhou et al., "Log-linear Sparse Attention", 2025,
arXiv 2512.16615, Sec. 3): the plan, the block hierarchy and the hierarchical top-K selection.

The grid is cut into blocks of s x s tokens (``block_size`` = s^2, 16 by default) and blocks of
blocks: a level-l block is an s^l x s^l square (the quadtree order of the paper makes each one a
contiguous range of tokens; here blocks are addressed by their 2D position, which is the same
hierarchy). q, k, v are mean-pooled per block at every level. Selection, coarse to fine: at the
coarsest level L each query block takes the top-K key blocks by pooled q . pooled k; at each finer
level a query block takes the top-K among the children of the blocks its parent selected, so the
selection costs O(N log N) rather than O(N^2). Attention, per query block of the finest level:
the tokens of its selected blocks, plus the pooled key/value tokens of every block scored during
its selection (the candidates at each level, all blocks at level L), each pooled token weighted as
the number of tokens it stands for (log(count) added to its score). As in the official kernels, a
selected block is thus seen both at full resolution and through its pooled token.

Any grid and any K: blocks at the borders are partial (pooling and weights count only real
tokens), and where fewer than K candidates exist the selection has -1 entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..core import checks
from ..core.compile_constant import compile_constant, fields_of
from ..core.gathered import gather_rows
from ..core.precision import compute_dtype
from ..core.tiles import TileLayout, exact_tile_sums, tile_layout, tile_sums


@dataclass(frozen=True, eq=False)
class BlockHierarchy:
    """Blocks of every level (index 0 = level 1, the attention tiles), each in raster order of
    its level's block grid. ``children[l]`` (n_{l+1}, s*s): the level-l blocks in each block one
    level up (-1 where the grid ends); ``parent[l]`` (n_l,) the inverse and ``child_slot[l]`` (n_l,)
    each block's column in its parent's row of ``children``; ``ancestor[l]`` (n_1,): the
    level-(l+1) block holding each finest block; ``counts[l]`` (n_l,): real tokens per block."""

    side: int
    layouts: tuple[TileLayout, ...]
    children: tuple[torch.Tensor, ...]
    parent: tuple[torch.Tensor, ...]
    child_slot: tuple[torch.Tensor, ...]
    ancestor: tuple[torch.Tensor, ...]
    counts: tuple[torch.Tensor, ...]

    @property
    def num_levels(self) -> int:
        return len(self.layouts)

    def num_blocks(self, level: int) -> int:
        return self.layouts[level].num_tiles

    def group_of_finest(self, level: int) -> torch.Tensor:
        """(n_1,) the candidate group of each finest block at ``level``: the level-(l+2) block that
        holds it (its level-l ancestor's parent), or group 0 at the coarsest level (one group)."""
        if level + 1 < self.num_levels:
            return self.ancestor[level + 1]
        return torch.zeros_like(self.ancestor[0])


def _raster_id(coords: torch.Tensor, tiles_per_side: tuple[int, int]) -> torch.Tensor:
    return coords[..., 0] * tiles_per_side[1] + coords[..., 1]


@compile_constant
def _hierarchy_parts(grid: tuple[int, int], side: int, levels: int, device: torch.device | None) -> tuple:
    """``block_hierarchy``'s fields, each TileLayout as its fields (see ``compile_constant``)."""
    layouts = tuple(tile_layout(grid, (side ** l, side ** l), False, device) for l in range(1, levels + 1))
    children, parent, slot, ancestor = [], [], [], [torch.arange(layouts[0].num_tiles, device=device)]
    offsets = torch.cartesian_prod(torch.arange(side), torch.arange(side)).to(device)
    for fine, coarse in zip(layouts, layouts[1:]):
        parent.append(_raster_id(fine.coords // side, coarse.tiles_per_side))
        slot.append(_raster_id(fine.coords % side, (side, side)))
        child = coarse.coords[:, None, :] * side + offsets                   # (n_coarse, s*s, 2)
        inside = (child < torch.tensor(fine.tiles_per_side, device=device)).all(-1)
        children.append(torch.where(inside, _raster_id(child, fine.tiles_per_side), -1))
        ancestor.append(parent[-1][ancestor[-1]])
    counts = tuple(layout.valid.sum(-1) for layout in layouts)
    return (side, tuple(fields_of(layout) for layout in layouts), tuple(children), tuple(parent), tuple(slot),
            tuple(ancestor), counts)


def block_hierarchy(grid: tuple[int, int], side: int, levels: int,
                    device: torch.device | None = None) -> BlockHierarchy:
    """The blocks of ``levels`` levels of side s, s^2, ... over an image grid: built once per
    (grid, side, levels, device) and cached; under ``torch.compile`` constants, not traced, and
    specialized to the grid (see ``compile_constant``)."""
    side, layouts, *index = _hierarchy_parts(grid, side, levels, device)
    return BlockHierarchy(side, tuple([TileLayout(*fields) for fields in layouts]), *index)


ONE_LEVEL_BELOW = 16384     # tokens: the paper and its official code use one level below this


def auto_levels(grid: tuple[int, int], side: int, top_k: int) -> int:
    """One level below 16,384 tokens, as the paper and its code recommend (the pooled tokens of every
    block are then few enough to attend all of them); from there, add levels while the coarsest one has
    more blocks than a finer level's candidate list (top_k * s^2) and the next one still has top_k
    blocks: the coarsest (dense) selection then costs no more per query block than the others. For
    s = 4, K = 8 this gives one level below 128x128, two at 128x128 and three at 256x256."""
    levels = 1
    if math.prod(grid) < ONE_LEVEL_BELOW:
        return levels
    blocks = lambda l: math.prod(-(-g // side ** l) for g in grid)        # noqa: E731
    while blocks(levels) > top_k * side * side and blocks(levels + 1) >= top_k:
        levels += 1
    return levels


def check_select_options(options: Mapping[str, Any], op: str = "loglinear_attention") -> None:
    """The selection options' values that need no grid: ``block_size`` a perfect square int >= 4,
    ``top_k`` an int >= 1 or a non-empty tuple or list of them (top_k <= 0 would select nothing, and
    the automatic level count would never stop), ``levels`` None or an int >= 1."""
    if "block_size" in options:
        block_size = checks.as_int(options["block_size"])
        side = math.isqrt(block_size) if block_size is not None and block_size >= 0 else 0
        if side < 2 or side * side != block_size:
            raise ValueError(f"{op}: block_size must be a perfect square int >= 4 (blocks are s x s patches), "
                             f"got {options['block_size']!r}")
    if "top_k" in options:
        top_k = options["top_k"]
        if isinstance(top_k, (tuple, list)):
            if not top_k or any(checks.as_int(k) is None or checks.as_int(k) < 1 for k in top_k):
                raise ValueError(f"{op}: top_k must be an int >= 1 or a non-empty tuple of them (one per level, "
                                 f"finest first), got {top_k!r}")
        else:
            checks.check_int(top_k, "top_k", op)
    if options.get("levels") is not None:
        checks.check_int(options["levels"], "levels", op)


def block_side(grid: tuple[int, ...], block_size: int) -> int:
    """The side s of the s x s blocks: sqrt(block_size), or, for a block wider than the grid (one block
    whatever its size), the smallest power of two covering the grid's longest side."""
    return min(math.isqrt(block_size), max(2, 1 << (max(grid) - 1).bit_length()))


@compile_constant
def selects_every_block(grid: tuple[int, ...], block_size: int = 16, top_k: int | Sequence[int] = 8,
                        levels: int | None = None) -> bool:
    """True where the finest level has no more blocks than its top-K: every block is selected, so the
    attention is exact dense attention (the family record's ``dense_on``)."""
    check_select_options(dict(block_size=block_size, top_k=top_k, levels=levels), "loglinear_attention")
    side = block_side(grid, block_size)
    finest_k = top_k[0] if isinstance(top_k, (tuple, list)) else top_k
    return math.prod(-(-g // side) for g in grid) <= finest_k


@compile_constant
def normalize_options(grid: tuple[int, int], block_size: int = 16, top_k: int | Sequence[int] = 8,
                      levels: int | None = None) -> tuple[int, tuple[int, ...]]:
    """Check the selection options for this grid: (block side s, top-K per level, finest first).

    ``top_k``: one K for every level or one per level (then ``levels`` defaults to their number);
    ``levels``: None picks ``auto_levels``; at most the levels until one block covers the grid. A
    block side larger than the grid's longest side is clamped to the smallest power of two covering
    it (one block holds the grid either way: the same selection and output, without a huge padded
    block). Cached; under ``torch.compile`` the checks run eagerly (see ``compile_constant``).
    """
    op = "loglinear_attention"
    check_select_options(dict(block_size=block_size, top_k=top_k, levels=levels), op)
    side = block_side(grid, block_size)
    # compile_constant makes lists tuples; NumPy or torch ints become Python ints here
    per_level = tuple(checks.as_int(k) for k in top_k) if isinstance(top_k, tuple) else None
    top_k, levels = checks.as_int(top_k) if per_level is None else None, checks.as_int(levels)
    asked = f"levels={levels}" if levels is not None else f"top_k={per_level} (one K per level)"
    if levels is None:
        levels = len(per_level) if per_level else auto_levels(grid, side, top_k)
    if per_level is not None and len(per_level) != levels:
        raise ValueError(f"{op}: top_k gives {len(per_level)} values for {levels} levels")
    covering = next(l for l in range(1, 64) if side ** l >= max(grid))        # one block covers the grid
    if levels > covering:
        raise ValueError(f"{op}: {asked} asks for {levels} levels, more than the grid {tuple(grid)} has: at level "
                         f"{covering} one block of {side ** covering}x{side ** covering} tokens covers it; use "
                         f"at most {covering} levels")
    top_k = per_level or (top_k,) * levels
    for level, k in enumerate(top_k):
        blocks = math.prod(-(-g // side ** (level + 1)) for g in grid)
        checks.check_top_k(k, blocks, f"level-{level + 1} blocks ({side ** (level + 1)}x{side ** (level + 1)} "
                                      f"tokens) of the grid {tuple(grid)}", op)
        if level + 1 < levels and k > top_k[level + 1] * side * side:
            raise ValueError(f"{op}: top_k={k} at level {level + 1} is larger than its {top_k[level + 1] * side * side} "
                             f"candidates (the children of the {top_k[level + 1]} blocks selected one level up)")
    return side, tuple(top_k)


@dataclass(frozen=True, eq=False)
class Selection:
    """Per level (index 0 = finest): the selected key blocks of every query block (B, h, n_l, K_l),
    -1 where none, and the candidates scored. Query blocks with the same parent score the same
    candidates (the children of the blocks their parent selected), so these are kept once per
    group: (B, h, n_{l+1}, C_l), group = the parent (``hierarchy.parent[l]``); at the coarsest
    level one group holds every query block and every block is a candidate: (1, 1, 1, n_L)."""

    selected: tuple[torch.Tensor, ...]
    candidates: tuple[torch.Tensor, ...]

    def cost(self, hierarchy: BlockHierarchy) -> int:
        """Block pairs scored during the selection (the O(N log N) part): each group's candidates
        times the query blocks in the group (a parent's children; every block at the top)."""
        total = 0
        for level, (s, c) in enumerate(zip(self.selected, self.candidates)):
            if level + 1 < hierarchy.num_levels:
                group_sizes = (hierarchy.children[level] >= 0).sum(-1).to(c.device)
            else:
                group_sizes = s.shape[2]
            pairs = ((c >= 0).sum(-1) * group_sizes).sum()
            total += int(pairs) * (s.shape[0] * s.shape[1]) // (c.shape[0] * c.shape[1])
        return total


def pool_levels(x: torch.Tensor, hierarchy: BlockHierarchy) -> list[torch.Tensor]:
    """The mean of the real tokens of each block at every level, finest first, float32 or wider, in
    O(N): level 1 sums the tokens of each tile, each coarser level sums its children's sums."""
    sums = tile_sums(x, hierarchy.layouts[0], compute_dtype(x))
    pooled = [sums / hierarchy.counts[0][:, None]]
    side = hierarchy.side
    for level, kids in enumerate(hierarchy.children, start=1):
        blocks = hierarchy.layouts[level - 1].tiles_per_side          # the finer level's block grid
        if all(n % side == 0 for n in blocks):
            sums = exact_tile_sums(sums, blocks, (side, side))
        else:
            padded = torch.cat([sums, sums.new_zeros(*sums.shape[:-2], 1, sums.shape[-1])], -2)
            sums = padded[:, :, kids.masked_fill(kids < 0, sums.shape[-2])].sum(-2)
        pooled.append(sums / hierarchy.counts[level][:, None])
    return pooled


@torch.no_grad()
def select_blocks(pooled_q: Sequence[torch.Tensor], pooled_k: Sequence[torch.Tensor],
                  hierarchy: BlockHierarchy, top_k: Sequence[int]) -> Selection:
    """Hierarchical top-K (coarse to fine) on pooled q, k of every level ((B, h, n_l, d) each).

    Below the coarsest level the siblings of one parent are scored together: their pooled queries
    (s*s, d) against the parent's candidates (C, d), one small matrix product per parent."""
    top = hierarchy.num_levels - 1
    scores = pooled_q[top] @ pooled_k[top].transpose(-2, -1)
    n_top = scores.shape[-1]
    selected = [scores.topk(top_k[top], dim=-1).indices]
    candidates = [torch.arange(n_top, device=scores.device)[None, None, None]]
    for level in range(top - 1, -1, -1):
        kids = hierarchy.children[level]                                             # (n_{l+1}, s*s)
        choice = selected[0]                                                         # (B, h, n_{l+1}, K_{l+1})
        cand = torch.where(choice[..., None] >= 0, kids[choice.clamp_min(0)], -1).flatten(-2)
        scores = gather_rows(pooled_q[level], kids) @ gather_rows(pooled_k[level], cand).transpose(-2, -1)
        best = scores.masked_fill(cand[..., None, :] < 0, float("-inf")).topk(top_k[level], dim=-1)
        picked = cand[..., None, :].expand(scores.shape).gather(-1, best.indices)   # (B, h, n_{l+1}, s*s, K_l)
        picked = torch.where(torch.isfinite(best.values), picked, -1)
        selected.insert(0, picked[:, :, hierarchy.parent[level], hierarchy.child_slot[level]])
        candidates.insert(0, cand)
    return Selection(tuple(selected), tuple(candidates))
