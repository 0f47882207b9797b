"""``subquad bench --suite linear``: the linear family's Triton kernels (FLatten, MALA, agent attention).

Per op and size (B x heads 4 x head_dim 64, bf16 by default): median ms of the forward and of
forward+backward (triton.testing.do_bench), the effective GB/s over the minimum bytes (forward: q, k, v
read once and O written once; forward+backward: also dO read and dq, dk, dv written once), and the
ratios to the naive PyTorch reference and to SDPA measured in the same run. The tuning aids (per-kernel
device times, host time per call, launch-configuration sweeps) read the kernels' launch configurations:

    python -m subquad.tasks.bench.linear [--profile] [--host] [--sweep [--forward] [--terms 3,2,1]] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import itertools
import math
import pstats
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ...kernels import agent_attention, focused_linear_attention, mala_attention
from ...kernels.agent import triton as agent_kernels
from ...kernels.core.triton_common import LAUNCHED
from ...kernels.linear import triton as linear_kernels
from ..tables import format_table, save_csv
from .measure import cuda_graphed, kernel_ms

Size = tuple[tuple[int, int], int]          # ((H, W), batch)
SIZES: list[Size] = [((56, 56), 32), ((128, 128), 4), ((256, 256), 1)]
OPS = ("focused_linear", "mala", "mala_rope", "agent")
HEADS, HEAD_DIM, NUM_AGENTS = 4, 64, 49


def _op_call(op: str, grid: tuple[int, int], params: dict[str, torch.Tensor]) -> Callable:
    """fn(q, k, v, backend) -> O for one op, with its learnable parameters (FLatten's scale, agent biases)."""
    if op == "focused_linear":
        return lambda q, k, v, backend: focused_linear_attention(q, k, v, grid=grid, focusing_factor=3,
                                                                 scale=params["scale"], backend=backend)
    if op in ("mala", "mala_rope"):
        return lambda q, k, v, backend: mala_attention(q, k, v, grid=grid, rope=op == "mala_rope", backend=backend)
    return lambda q, k, v, backend: agent_attention(q, k, v, grid=grid, num_agents=NUM_AGENTS,
                                                    agent_bias=(params["b1"], params["b2"]), backend=backend)


def _inputs(b: int, n: int, dtype: torch.dtype, device: str):
    q, k, v = (torch.randn(b, HEADS, n, HEAD_DIM, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    params = dict(scale=torch.randn(HEADS, HEAD_DIM, device=device, requires_grad=True),
                  b1=(0.1 * torch.randn(HEADS, NUM_AGENTS, n, device=device)).requires_grad_(),
                  b2=(0.1 * torch.randn(HEADS, n, NUM_AGENTS, device=device)).requires_grad_())
    return q, k, v, params


def _graph_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: its device time with no host in the loop (what
    torch.compile's CUDA graphs or a captured model see); NaN if ``fn`` cannot be captured."""
    try:
        replay = cuda_graphed(fn, torch.device("cuda", torch.cuda.current_device()))
    except RuntimeError as e:
        print(f"bench_linear: not captured in a CUDA graph: {str(e).splitlines()[0][:120]}")
        return math.nan
    return kernel_ms(replay)


def _time_pair(fn: Callable, inputs: Sequence[torch.Tensor], grad: torch.Tensor,
               graphs: bool = False) -> tuple[float, ...]:
    """(forward ms without autograd, forward+backward ms) of fn() -> O with respect to ``inputs``, each the
    median wall time of eager calls; ``graphs``: then also both replayed from CUDA graphs."""
    def forward():
        with torch.no_grad():
            return fn()

    def forward_backward():
        return torch.autograd.grad(fn(), inputs, grad)
    times = (kernel_ms(forward), kernel_ms(forward_backward))
    return times + ((_graph_ms(forward), _graph_ms(forward_backward)) if graphs else ())


def copy_bandwidth_gbps(device: str = "cuda") -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written: the memory ceiling."""
    a = torch.empty(2 ** 28, device=device, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / (kernel_ms(lambda: b.copy_(a)) * 1e-3) / 1e9


def bench_linear_family(device: str = "cuda", sizes: Sequence[Size] = SIZES,
                        ops: Sequence[str] = OPS, dtype: torch.dtype = torch.bfloat16,
                        with_reference: bool = True) -> list[dict]:
    """One row per (op, size, pass) with triton/reference/SDPA ms, effective GB/s and the ratios: eager (the
    wall time of each call, host included) and replayed from CUDA graphs (device time alone)."""
    rows = []
    for (gh, gw), b in sizes:
        n = gh * gw
        q, k, v, params = _inputs(b, n, dtype, device)
        grad = torch.randn_like(q)
        sdpa = _time_pair(lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)
        tensor_bytes = b * HEADS * n * HEAD_DIM * q.element_size()
        for op in ops:
            call = _op_call(op, (gh, gw), params)
            inputs = [q, k, v] + ([params["scale"]] if op == "focused_linear" else [])
            inputs += [params["b1"], params["b2"]] if op == "agent" else []
            triton_ms = _time_pair(lambda: call(q, k, v, "triton"), inputs, grad, graphs=True)
            ref_ms = (_time_pair(lambda: call(q, k, v, "reference"), inputs, grad, graphs=True) if with_reference
                      else (math.nan,) * 4)
            rows += _rows(op, (gh, gw), b, dtype, tensor_bytes, triton_ms, ref_ms, sdpa)
        rows.extend(_fla_rows(q, k, v, grad, (gh, gw), b, dtype, tensor_bytes))
    return rows


def _rows(op: str, grid, b: int, dtype, tensor_bytes: int, ours, ref, sdpa) -> list[dict]:
    """The forward and forward+backward rows of one op from its (fwd, fwd+bwd, graph fwd, graph fwd+bwd) times
    and its reference's; effective GB/s over the minimum bytes: q, k, v read and O written once, and for the
    backward also dO read and dq, dk, dv written once."""
    rows = []
    passes = (("forward", 4 * tensor_bytes), ("forward+backward", 11 * tensor_bytes))
    for i, (pass_name, min_bytes) in enumerate(passes):
        rows.append(dict(op=op, grid=f"{grid[0]}x{grid[1]}", batch=b, heads=HEADS, head_dim=HEAD_DIM,
                         dtype=str(dtype).split(".")[-1], pass_=pass_name, triton_ms=ours[i], graph_ms=ours[2 + i],
                         reference_ms=ref[i], reference_graph_ms=ref[2 + i], sdpa_ms=sdpa[i],
                         gbps=min_bytes / (ours[i] * 1e-3) / 1e9, gbps_graph=min_bytes / (ours[2 + i] * 1e-3) / 1e9,
                         x_reference=ref[i] / ours[i], x_reference_graph=ref[2 + i] / ours[2 + i],
                         x_sdpa=sdpa[i] / ours[i]))
    return rows


def _fla_rows(q, k, v, grad, grid, b, dtype, tensor_bytes) -> list[dict]:
    """flash-linear-attention's fused linear attention (plain phi = identity), when the package is installed."""
    try:
        from fla.ops.linear_attn import fused_chunk_linear_attn
    except ImportError:
        return []
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    gt = grad.transpose(1, 2).contiguous()

    def fn():
        return fused_chunk_linear_attn(qt, kt, vt, normalize=True)[0]

    return _rows("fla_fused_chunk_linear_attn (causal)", grid, b, dtype, tensor_bytes,
                 _time_pair(fn, (qt, kt, vt), gt, graphs=True), (math.nan,) * 4, (math.nan,) * 2)


# --- per-kernel device time and a launch-configuration sweep (tuning aids) ---------------------

def kernel_times(call: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor | None,
                 reps: int = 5) -> dict[str, float]:
    """Mean device microseconds per forward+backward (``grad`` None: per forward) of each kernel
    (torch.profiler), host gaps excluded."""
    def step():
        if grad is None:
            with torch.no_grad():
                call(q, k, v, "triton")
        else:
            torch.autograd.grad(call(q, k, v, "triton"), (q, k, v), grad)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        total = getattr(evt, "self_device_time_total", None)
        if total is None:
            total = getattr(evt, "self_cuda_time_total", 0.0)
        if total > 0:
            name = evt.key if evt.key.startswith("_") else "torch:" + evt.key[:30]
            times[name] = times.get(name, 0.0) + total / reps
    return times


def profile_kernels(device: str = "cuda", sizes: Sequence[Size] = SIZES, ops: Sequence[str] = OPS,
                    dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per-kernel device microseconds of one forward+backward, with each kernel's share of the total."""
    rows = []
    for (gh, gw), b in sizes:
        q, k, v, params = _inputs(b, gh * gw, dtype, device)
        grad = torch.randn_like(q)
        for op in ops:
            times = kernel_times(_op_call(op, (gh, gw), params), q, k, v, grad)
            total = sum(times.values())
            for name, us in sorted(times.items(), key=lambda x: -x[1]):
                rows.append(dict(op=op, grid=f"{gh}x{gw}", batch=b, kernel=name, us=us, share=us / total))
    return rows


SWEEP = {  # kernel config key -> candidate launch options (BLOCK_N, num_warps, num_stages[, extra CONFIG keys])
    "linear": {"state": ((32, 4, 3), (32, 4, 4), (32, 4, 2), (64, 4, 3), (32, 8, 3), (16, 4, 3, dict(per_sm=8))),
               "output": ((64, 4, 2), (64, 4, 3), (32, 4, 2), (64, 4, 2, dict(per_sm=8)),
                          (64, 4, 2, dict(per_sm=32, max_tiles=4)), (128, 8, 2)),
               "focused_output": ((64, 4, 2), (64, 4, 3), (32, 4, 2), (64, 4, 2, dict(per_sm=8)),
                                  (64, 4, 2, dict(per_sm=32, max_tiles=4)), (128, 8, 2)),
               "norms": ((32, 4, 2), (16, 4, 2), (64, 4, 2), (32, 2, 2), (64, 8, 2), (128, 8, 2)),
               "bwd_q": ((32, 8, 2), (16, 4, 2), (64, 8, 2)), "bwd_k": ((32, 8, 2), (16, 4, 2), (64, 8, 2)),
               "gw_query": ((32, 4, 2), (64, 4, 2), (64, 8, 2)), "focused_bwd_k": ((32, 8, 2), (32, 4, 2), (64, 8, 2))},
    "agent": {"pool": ((64, 8, 3), (32, 4, 3)), "aggregate": ((32, 4, 3), (64, 8, 3), (16, 4, 3)),
              "broadcast": ((32, 4, 3), (64, 8, 3), (16, 4, 3)), "broadcast_bwd": ((32, 8, 2), (16, 4, 2)),
              "aggregate_bwd": ((32, 8, 2), (16, 4, 2)), "unpool": ((32, 4, 3), (64, 8, 3))},
}
KERNEL_OF = {"state": "_state_kernel", "output": "_output_kernel", "bwd_q": "_backward_q_kernel",
             "bwd_k": "_backward_k_kernel", "norms": "_token_norms_kernel", "focused_output": "_output_kernel",
             "gw_query": "_query_gw_kernel", "focused_bwd_k": "_focused_backward_k_kernel",
             "pool": "_pool_kernel", "aggregate": "_aggregate_kernel",
             "broadcast": "_broadcast_kernel", "broadcast_bwd": "_broadcast_bwd_kernel",
             "aggregate_bwd": "_aggregate_bwd_kernel", "unpool": "_unpool_kernel"}


def _set_candidate(config: dict[str, dict], base: dict[str, dict], key: str, cand: tuple) -> str:
    """Set config[key] to the default ``base[key]`` changed by the candidate; returns its label."""
    bn, w, st, *extra = cand
    config[key].clear()
    config[key].update(base[key], BLOCK_N=bn, num_warps=w, num_stages=st, **(extra[0] if extra else {}))
    return f"{bn}/{w}/{st}" + "".join(f" {k}={v}" for k, v in (extra[0] if extra else {}).items())


def sweep(device: str = "cuda", sizes: Sequence[Size] = (((128, 128), 4), ((56, 56), 32)),
          ops: Sequence[str] = ("focused_linear", "mala_rope", "agent"),
          dtype: torch.dtype = torch.bfloat16, backward: bool = True, terms: Sequence[int] = ()) -> list[dict]:
    """Each kernel's device time under each candidate configuration (all kernels of an op change together,
    candidate i with candidate i; a kernel with fewer candidates keeps its last); ``backward=False`` times the
    forward kernels alone. ``terms``: also time each OUTPUT_TERMS value (the output products) with the
    fastest output candidates."""
    rows = []
    for ((gh, gw), b), op in itertools.product(sizes, ops):
        q, k, v, params = _inputs(b, gh * gw, dtype, device)
        grad = torch.randn_like(q) if backward else None
        family = "agent" if op == "agent" else "linear"
        config = agent_kernels.CONFIG if family == "agent" else linear_kernels.CONFIG
        saved = {key: dict(cfg) for key, cfg in config.items()}
        best: dict[str, tuple[float, tuple]] = {}
        for i in range(max(len(c) for c in SWEEP[family].values())):
            picked = {key: cands[min(i, len(cands) - 1)] for key, cands in SWEEP[family].items()}
            chosen = {key: (_set_candidate(config, saved, key, cand), cand) for key, cand in picked.items()}
            times = kernel_times(_op_call(op, (gh, gw), params), q, k, v, grad)
            for key, (label, cand) in chosen.items():
                if KERNEL_OF[key] in times:
                    us = times[KERNEL_OF[key]]
                    rows.append(dict(op=op, grid=f"{gh}x{gw}", batch=b, kernel=KERNEL_OF[key], config=label,
                                     terms=linear_kernels.OUTPUT_TERMS, us=us))
                    print("sweep", *rows[-1].values(), flush=True)      # a cut-short run keeps what it measured
                    if us < best.get(key, (math.inf,))[0]:
                        best[key] = (us, cand)
        default_terms = linear_kernels.OUTPUT_TERMS
        for t in (terms if family == "linear" else ()):
            for key, (_, cand) in best.items():
                _set_candidate(config, saved, key, cand)
            linear_kernels.OUTPUT_TERMS = t
            times = kernel_times(_op_call(op, (gh, gw), params), q, k, v, grad)
            for key in ("output", "focused_output"):
                if key in best and KERNEL_OF[key] in times:
                    rows.append(dict(op=op, grid=f"{gh}x{gw}", batch=b, kernel=KERNEL_OF[key],
                                     config=_set_candidate(config, saved, key, best[key][1]), terms=t,
                                     us=times[KERNEL_OF[key]]))
                    print("sweep", *rows[-1].values(), flush=True)
        linear_kernels.OUTPUT_TERMS = default_terms
        for key in config:
            config[key].clear()
            config[key].update(saved[key])
    return rows


def host_costs(device: str = "cuda", size: Size = ((128, 128), 4),
               ops: Sequence[str] = ("focused_linear", "mala", "agent"),
               dtype: torch.dtype = torch.bfloat16, calls: int = 100) -> list[dict]:
    """Where a forward's wall time goes: host microseconds per call (enqueueing ``calls`` forwards without
    waiting), do_bench's median wall time, and the device time of the same forward replayed from a CUDA
    graph (no host in the loop); prints each op's top host functions (cProfile)."""
    (gh, gw), b = size
    q, k, v, params = _inputs(b, gh * gw, dtype, device)
    rows = []
    for op in ops:
        call = _op_call(op, (gh, gw), params)
        with torch.no_grad():
            fn = lambda: call(q, k, v, "triton")       # noqa: E731
            wall = kernel_ms(fn)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            host_us = (time.perf_counter() - start) / calls * 1e6
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph_ms = kernel_ms(graph.replay)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                fn()
            profiler.disable()
            torch.cuda.synchronize()
        print(f"--- {op} {gh}x{gw} B{b}: host {host_us:.1f} us/call, wall {wall * 1e3:.1f} us, "
              f"graph {graph_ms * 1e3:.1f} us")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
        rows.append(dict(op=op, grid=f"{gh}x{gw}", batch=b, host_us=host_us, wall_us=wall * 1e3,
                         graph_us=graph_ms * 1e3))
    return rows


def kernel_resources() -> list[dict]:
    """Registers and spills of the last compiled variant of each kernel launched in this process."""
    return [dict(kernel=name, regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                 shared=getattr(k.metadata, "shared", None) if hasattr(k, "metadata") else None)
            for name, k in sorted(LAUNCHED.items())]


def _print_table(rows: list[dict]) -> None:
    if rows:
        print(format_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m subquad.tasks.bench.linear", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    parser.add_argument("--forward", action="store_true", help="sweep the forward kernels alone")
    parser.add_argument("--terms", default="", help="with --sweep: OUTPUT_TERMS values to time, e.g. 3,2,1")
    parser.add_argument("--ops", default=None, help="with --sweep: ops to sweep, e.g. focused_linear,mala")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    parser.add_argument("--profile", action="store_true", help="also print per-kernel device times")
    parser.add_argument("--host", action="store_true", help="also measure host time per forward (and cProfile it)")
    parser.add_argument("--out", default=".", help="folder for the CSV files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy_bandwidth_gbps():.0f} GB/s")
    if not args.no_bench:
        rows = bench_linear_family()
        save_csv(rows, out / "bench_linear.csv")
        _print_table(kernel_resources())
        _print_table(rows)
    if args.profile:
        rows = profile_kernels()
        save_csv(rows, out / "kernels_linear.csv")
        _print_table(rows)
    if args.host:
        _print_table(host_costs())
    if args.sweep:
        ops = dict(ops=tuple(args.ops.split(","))) if args.ops else {}
        rows = sweep(sizes=SIZES, backward=not args.forward, terms=[int(t) for t in args.terms.split(",") if t], **ops)
        save_csv(rows, out / "sweep_linear.csv")
        _print_table(rows)


if __name__ == "__main__":
    main()
