"""``subquad bench --suite grid-conv``: the Triton depthwise conv on the grid (DWC / LePE) against the
reference (cuDNN).

Per size (B x 4 heads x head_dim 64, bf16) and use (agent: k = 3, one filter per channel; FLatten: k = 5,
one filter per head channel; MALA: k = 5 per channel), all with bias and the fused residual: median ms of
the forward and of forward+backward (triton.testing.do_bench), the effective GB/s over the minimum bytes
(forward: x and residual read once, out written once; backward: g and x read once, dx written once) and
the ratios to the reference measured in the same run.

    subquad bench --suite grid-conv                        (table and CSV file)
    python -m subquad.tasks.bench.grid_conv [--sweep]      (CSV on stdout; --sweep: tile shapes and warps)
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, Sequence

import torch

from ...kernels import depthwise_conv_on_grid
from ...kernels.grid_conv import triton as grid_conv
from ..tables import save_csv
from .measure import kernel_ms

Size = tuple[tuple[int, int], int]          # ((H, W), batch)
SIZES: list[Size] = [((56, 56), 32), ((128, 128), 4), ((256, 256), 1)]
USES: list[tuple[str, int, bool]] = [("agent", 3, False), ("flatten", 5, True), ("mala", 5, False)]  # name, k, shared
HEADS, HEAD_DIM = 4, 64
Timer = Callable[[Callable[[], object]], float]


def _time_pair(fn: Callable, inputs: Sequence[torch.Tensor], grad: torch.Tensor, timer: Timer) -> tuple[float, float]:
    """(forward ms without autograd, forward+backward ms) of fn() -> out with respect to ``inputs``."""
    with torch.no_grad():
        fwd = timer(fn)
    return fwd, timer(lambda: torch.autograd.grad(fn(), inputs, grad))


def bench_grid_conv(device: str = "cuda", sizes: Sequence[Size] = SIZES,
                    uses: Sequence[tuple[str, int, bool]] = USES, dtype: torch.dtype = torch.bfloat16,
                    num_prefix: int = 0, timer: Timer = kernel_ms) -> list[dict]:
    """One row per (size, use): triton and reference ms (forward, forward+backward), GB/s and the ratios."""
    rows = []
    for (gh, gw), b in sizes:
        x, res = (torch.randn(b, HEADS, num_prefix + gh * gw, HEAD_DIM, device=device, dtype=dtype,
                              requires_grad=True) for _ in range(2))
        grad = torch.randn_like(x)
        tensor_bytes = x.numel() * x.element_size()
        for name, k, shared in uses:
            channels = HEAD_DIM if shared else HEADS * HEAD_DIM
            weight = torch.randn(channels, 1, k, k, device=device, requires_grad=True)
            bias = torch.randn(channels, device=device, requires_grad=True)

            def call(backend: str) -> torch.Tensor:
                return depthwise_conv_on_grid(x, weight, bias, grid=(gh, gw), num_prefix=num_prefix, residual=res,
                                              backend=backend)

            inputs = (x, weight, bias, res)
            ours = _time_pair(lambda: call("triton"), inputs, grad, timer)
            ref = _time_pair(lambda: call("reference"), inputs, grad, timer)
            rows.append(dict(use=name, grid=f"{gh}x{gw}", batch=b, heads=HEADS, head_dim=HEAD_DIM, kernel=k,
                             channels="d" if shared else "h*d", dtype=str(dtype).split(".")[-1],
                             triton_fwd_ms=ours[0], triton_fwd_bwd_ms=ours[1], reference_fwd_ms=ref[0],
                             reference_fwd_bwd_ms=ref[1], fwd_gbps=3 * tensor_bytes / (ours[0] * 1e-3) / 1e9,
                             fwd_bwd_gbps=6 * tensor_bytes / (ours[1] * 1e-3) / 1e9,
                             x_reference_fwd=ref[0] / ours[0], x_reference_fwd_bwd=ref[1] / ours[1]))
    return rows


SWEEP = dict(TILE=((8, 8), (8, 16), (16, 16), (4, 16)), num_warps=(4, 8))


def sweep(device: str = "cuda", sizes: Sequence[Size] = SIZES, uses: Sequence[tuple[str, int, bool]] = USES,
          dtype: torch.dtype = torch.bfloat16, timer: Timer = kernel_ms) -> list[dict]:
    """bench_grid_conv under each tile shape and warp count (forward and backward kernels alike)."""
    saved = {key: dict(cfg) for key, cfg in grid_conv.CONFIG.items()}
    rows = []
    try:
        for (tile_h, tile_w), warps in itertools.product(SWEEP["TILE"], SWEEP["num_warps"]):
            for key in ("forward", "backward"):
                grid_conv.CONFIG[key].update(TILE_H=tile_h, TILE_W=tile_w, num_warps=warps)
            for row in bench_grid_conv(device, sizes, uses, dtype, timer=timer):
                rows.append(dict(tile=f"{tile_h}x{tile_w}", num_warps=warps, **row))
                print("sweep", *rows[-1].values(), file=sys.stderr, flush=True)   # a cut-short run keeps its rows
    finally:
        for key, cfg in saved.items():
            grid_conv.CONFIG[key].clear()
            grid_conv.CONFIG[key].update(cfg)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m subquad.tasks.bench.grid_conv",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time tile shapes and warp counts instead")
    args = parser.parse_args(argv)
    save_csv(sweep() if args.sweep else bench_grid_conv(), sys.stdout)


if __name__ == "__main__":
    main()
