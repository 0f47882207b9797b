"""``subquad bench --suite block-sparse``: speed of the block-sparse core on a GPU against dense SDPA, the
ideal (density x SDPA time) and FlexAttention compiled with the same block mask.

``python -m subquad.tasks.bench.block_sparse --out results.csv [--sweep]`` prints a table (``--sweep``
also times launch configurations); ``bench_block_sparse()`` returns the rows. ``--radial-video`` times radial
attention at Wan's shapes instead, its tiles listed against its full frames read as key spans
(``bench_radial_video``). Sparsity: each 128-query
block attends a random set of round(density x blocks) 128-key blocks (its own block among them), per
head; our kernel gets the same blocks as key tiles of 64 (two per block) and of 128.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ...kernels.block_sparse import triton as bs
from ...kernels.block_sparse.layout import block_mask_to_csr
from ...kernels.radial.block_sparse import radial_attention_on_core, radial_core_layout
from ...kernels.radial.full_frames import radial_attention_full_frames
from ...kernels.radial.plan import normalize_options, tile_size
from ...kernels.core.testing import relative_error
from ..tables import format_table, save_csv
from .measure import kernel_ms

EXP_RATE = 3.9e12          # exp2 per second on the H100 SXM's special-function units (FA3 paper, Sec. 3)


def random_block_mask(heads: int, blocks: int, density: float, device: str, seed: int = 0) -> torch.Tensor:
    """(1, heads, blocks, blocks) bool with round(density * blocks) >= 1 blocks per row, the diagonal included."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_row = max(1, round(density * blocks))
    score = torch.rand(heads, blocks, blocks, generator=g)
    score[:, torch.arange(blocks), torch.arange(blocks)] = 2.0
    chosen = score.topk(per_row, dim=-1).indices
    mask = torch.zeros(heads, blocks, blocks, dtype=torch.bool).scatter_(-1, chosen, True)
    return mask[None].to(device)


def _fwd_bwd(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> Callable:
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def matmul_peak_tflops(device: str = "cuda") -> float:
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / kernel_ms(lambda: a @ b) * 1e-9


def bench_block_sparse(device: str = "cuda", tokens: Sequence[int] = (16384, 32768, 65536),
                       densities: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0), heads: int = 4, head_dim: int = 64,
                       dtype: torch.dtype = torch.bfloat16,
                       tile_sizes: Sequence[tuple[int, int]] = ((128, 64), (128, 128)), flex: bool = True,
                       log: Callable[[str], None] = print) -> list[dict]:
    """One row per (tokens, density, our tile size): median ms forward and forward+backward, TFLOP/s,
    the roofline floor, and ratios to SDPA, to the ideal density x SDPA and to FlexAttention."""
    if flex:
        flex_fn = torch.compile(flex_attention, dynamic=False)
    peak = matmul_peak_tflops(device)
    log(f"bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s; exp rate assumed {EXP_RATE / 1e12:.1f} T/s")
    rows = []
    for n in tokens:
        q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        sdpa = F.scaled_dot_product_attention
        t_sdpa = (kernel_ms(lambda: sdpa(q, k, v)), kernel_ms(_fwd_bwd(sdpa, q, k, v, do)))
        dense_flops = 4 * heads * n * n * head_dim
        log(f"N={n}: SDPA {t_sdpa[0]:.3f} / {t_sdpa[1]:.3f} ms "
            f"({dense_flops / t_sdpa[0] * 1e-9:.0f} / {3.5 * dense_flops / t_sdpa[1] * 1e-9:.0f} TFLOP/s)")
        blocks = n // 128
        for density in densities:
            mask = random_block_mask(heads, blocks, density, device)
            real_density = mask.sum().item() / mask.numel()
            pairs = mask.sum().item() * 128 * 128
            flops = 4 * pairs * head_dim
            floor = (max(flops / (peak * 1e12), pairs / EXP_RATE) * 1e3,
                     max(3.5 * flops / (peak * 1e12), 3 * pairs / EXP_RATE) * 1e3)
            t_flex = (math.nan, math.nan)
            if flex:
                counts = mask.sum(-1, dtype=torch.int32)
                order = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
                block_mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), order, counts, order,
                                                      BLOCK_SIZE=128)
                fx = lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask)  # noqa: E731
                t_flex = (kernel_ms(lambda: fx(q, k, v)), kernel_ms(_fwd_bwd(fx, q, k, v, do)))
            for bm, bn in tile_sizes:
                tile_mask = mask.repeat_interleave(128 // bm, 2).repeat_interleave(128 // bn, 3)
                row_ptr, col_idx = block_mask_to_csr(tile_mask)
                ours = lambda q, k, v: bs.block_sparse_attention_triton(  # noqa: E731
                    q, k, v, row_ptr, col_idx, bm, bn)
                t = (kernel_ms(lambda: ours(q, k, v)), kernel_ms(_fwd_bwd(ours, q, k, v, do)))
                row = dict(tokens=n, heads=heads, head_dim=head_dim, dtype=str(dtype).split(".")[-1],
                           density=round(real_density, 4), block_m=bm, block_n=bn,
                           fwd_ms=t[0], fwdbwd_ms=t[1],
                           fwd_tflops=flops / t[0] * 1e-9, fwdbwd_tflops=3.5 * flops / t[1] * 1e-9,
                           floor_fwd_ms=floor[0], floor_fwdbwd_ms=floor[1],
                           sdpa_fwd_ms=t_sdpa[0], sdpa_fwdbwd_ms=t_sdpa[1],
                           vs_ideal_fwd=t[0] / (real_density * t_sdpa[0]),
                           vs_ideal_fwdbwd=t[1] / (real_density * t_sdpa[1]),
                           flex_fwd_ms=t_flex[0], flex_fwdbwd_ms=t_flex[1],
                           speedup_vs_flex_fwd=t_flex[0] / t[0], speedup_vs_flex_fwdbwd=t_flex[1] / t[1])
                rows.append(row)
                log(" ".join(f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}"
                             for key, val in row.items()))
    return rows


SWEEP_CANDIDATES = {
    "fwd": ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4)),
    "bwd_kv": ((4, 2), (4, 3), (8, 2), (8, 3)),
    "bwd_q": ((4, 2), (4, 3), (8, 2), (8, 3)),
}


def sweep_launch_configs(device: str = "cuda", n: int = 32768, density: float = 0.25, heads: int = 4,
                         head_dim: int = 64, tile_sizes: Sequence[tuple[int, int]] = ((128, 64), (64, 64), (128, 128)),
                         install: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Time each kernel under a few (num_warps, num_stages), bf16; check each config's result against the
    default's; with ``install``, put the fastest correct one in ``TUNED_CONFIGS`` (used from then on)."""
    mask = random_block_mask(heads, n // 128, density, device)
    q, k, v, do = (torch.randn(1, heads, n, head_dim, device=device, dtype=torch.bfloat16) for _ in range(4))
    scale = head_dim ** -0.5
    results = []
    for bm, bn in tile_sizes:
        row_ptr, col_idx = block_mask_to_csr(mask.repeat_interleave(128 // bm, 2).repeat_interleave(128 // bn, 3))
        args = (row_ptr, col_idx, None, None, None, None, bm, bn, 0, scale)
        o, lse = bs.forward(q, k, v, *args)
        grads = bs.backward(do, q, k, v, o, lse, *args)
        for kind, candidates in SWEEP_CANDIDATES.items():
            best = None
            for warps, stages in candidates:
                cfg = {"num_warps": warps, "num_stages": stages}
                if kind == "fwd":
                    fn, expected = (lambda: bs.forward(q, k, v, *args, config=cfg)[:1]), (o,)
                else:
                    fn, expected = (lambda: bs.backward(do, q, k, v, o, lse, *args, configs={kind: cfg})), grads
                try:
                    err = max(relative_error(a, b) for a, b in zip(fn(), expected))
                    ms = kernel_ms(fn)
                except Exception as exc:        # a config that does not fit (shared memory) is skipped
                    log(f"bm={bm} bn={bn} {kind} {cfg}: {type(exc).__name__}")
                    continue
                results.append(dict(block_m=bm, block_n=bn, kernel=kind, num_warps=warps, num_stages=stages,
                                    ms=ms, rel_err_vs_default=err))
                log(f"bm={bm} bn={bn} {kind} warps={warps} stages={stages}: {ms:.3f} ms (err {err:.1e})")
                if err < 5e-3 and (best is None or ms < best[0]):
                    best = (ms, cfg)
            if install and best is not None:
                bs.TUNED_CONFIGS[(kind, bm, bn, head_dim, 2)] = best[1]
    log(f"TUNED_CONFIGS = {bs.TUNED_CONFIGS!r}")
    return results


def bench_radial_video(grids: Sequence[tuple[int, int, int]] = ((21, 30, 52), (21, 45, 80), (9, 30, 52)),
                       heads: int = 40, head_dim: int = 128, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       timer: Callable[[Callable[[], object]], float] = kernel_ms,
                       log: Callable[[str], None] = print) -> list[dict]:
    """Radial attention on video grids (default: Wan 2.1 14B's latent grids at 480x832 and 720x1280, 81 frames, and
    480x832, 33 frames; its heads and head dim), inference, the video default mask (``frames``, decay 0.2): dense SDPA,
    the core with every tile listed, and the core with the full frames read as key spans by query tiles of two
    tiles of a frame (radial's inference path). Per row: ms of each, the fraction of token pairs computed and each
    path's cost per computed pair relative to dense (time / (dense time x fraction)); q, k, v heads-last views, as
    the pipelines pass them."""
    rows = []
    for grid in grids:
        n = math.prod(grid)
        qkv = torch.randn(1, n, 3, heads, head_dim, device=device, dtype=dtype)
        q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
        options = normalize_options(grid, decay_factor=0.2)
        tile = tile_size(options)
        row_ptr = radial_core_layout(grid, options, 0, q.device)[0]
        listed = lambda: radial_attention_on_core(q, k, v, grid, 0, options, core_backend="triton")  # noqa: E731
        spans = lambda: radial_attention_full_frames(q, k, v, grid, options)  # noqa: E731
        with torch.no_grad():
            dense_ms = timer(lambda: F.scaled_dot_product_attention(q, k, v))
            listed_ms, spans_ms = timer(listed), timer(spans)
            diff = relative_error(spans().float(), listed().float())
        pairs = int(row_ptr[0, 0, -1]) * tile * tile / n ** 2
        rows.append(dict(grid="x".join(map(str, grid)), tokens=n, heads=heads, head_dim=head_dim, pairs=pairs,
                         dense_ms=dense_ms, tiles_ms=listed_ms, spans_ms=spans_ms,
                         tiles_speedup=dense_ms / listed_ms, spans_speedup=dense_ms / spans_ms,
                         tiles_per_pair=listed_ms / (dense_ms * pairs), spans_per_pair=spans_ms / (dense_ms * pairs),
                         spans_vs_tiles_rel_diff=diff))
        log(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in rows[-1].items()))
    return rows


RADIAL_VIDEO_COLUMNS = ("grid", "tokens", "pairs", "dense_ms", "tiles_ms", "spans_ms", "tiles_speedup",
                        "spans_speedup", "tiles_per_pair", "spans_per_pair")
SUMMARY_COLUMNS = ("tokens", "density", "block_n", "fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops",
                   "floor_fwd_ms", "floor_fwdbwd_ms", "vs_ideal_fwd", "vs_ideal_fwdbwd", "speedup_vs_flex_fwd",
                   "speedup_vs_flex_fwdbwd")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m subquad.tasks.bench.block_sparse",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_block_sparse.csv")
    parser.add_argument("--sweep", action="store_true", help="also time launch configs (written beside --out)")
    parser.add_argument("--tokens", type=int, nargs="*", default=[16384, 32768, 65536])
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--radial-video", action="store_true",
                        help="instead: radial attention at Wan's video shapes, tiles listed vs full frames as spans")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.radial_video:
        rows = bench_radial_video(log=log)
        save_csv(rows, args.out)
        print(format_table(rows, [(c, c, None if c in ("grid", "tokens") else ".3f") for c in RADIAL_VIDEO_COLUMNS]))
        return
    if args.sweep:
        save_csv(sweep_launch_configs(log=log), args.out.replace(".csv", "_sweep.csv"))
    rows = bench_block_sparse(tokens=tuple(args.tokens), flex=not args.no_flex, log=log)
    save_csv(rows, args.out)
    print(format_table(rows, [(c, c, None if c in ("tokens", "block_n") else ".3f") for c in SUMMARY_COLUMNS]))


if __name__ == "__main__":
    sys.exit(main())
