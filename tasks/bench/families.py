"""``subquad bench``: every attention family against SDPA, measured in the same run.

Per family and grid: median milliseconds of the forward and of forward+backward, peak memory of the
forward, and the speedup over SDPA (SDPA time / family time). Saved as a CSV and a PNG plot.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from tqdm import tqdm

from ... import attention, kernels
from ..tables import format_table, save_csv
from .measure import cuda_graphed, median_ms, peak_memory_bytes

BASELINE = "softmax"        # dense softmax attention (SDPA): every speedup is measured against it


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    sizes: list[tuple[int, int, int]]          # (batch, H, W)
    families: list[str] = field(default_factory=attention.list)
    heads: int = 4
    head_dim: int = 64
    repeats: int = 10
    warmup: int = 2
    cuda_graph: bool = False                   # also time each call replayed from one CUDA graph (no host time)

    @classmethod
    def default(cls, device: str | None = None) -> "BenchConfig":
        """Real sizes in bf16 on a GPU (B x 4 heads x d 64); small float32 sizes on a CPU."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            return cls(dev, torch.bfloat16, [(32, 56, 56), (4, 128, 128), (1, 256, 256)], repeats=30, warmup=5)
        return cls(dev, torch.float32, [(1, 16, 16), (1, 32, 32), (1, 48, 48)], repeats=5, warmup=1)


# options that make a family comparable with its peers (natten has no relative position bias)
BENCH_OPTIONS = {"neighborhood": {"rpb": False}}
# a window family's window grows with the grid: k7 at 56x56, k13 at 128x128, k21 at 256x256 (the sizes of
# natten's benchmarks), the family's default elsewhere
WINDOW_KERNEL = {(56, 56): 7, (128, 128): 13, (256, 256): 21}

# other libraries' implementations, registered as backends of a family's op and measured beside it
# (in this order); the optional package each needs, where it has one
PEER_BACKENDS = ("natten", "flex")
PEER_PACKAGES = {"natten": "natten"}
_SKIPPED: set[str] = set()


def peers(name: str, device: torch.device) -> list[tuple[str, str]]:
    """(label, backend) of the peers measured beside family ``name``: the other libraries' backends of its
    op; a family with no implementation but its reference and its Triton kernel (the linear family) is
    compared on CUDA with its plain PyTorch reference."""
    backends = kernels.available_backends(kernels.family(name).op)
    found = [(b, b) for b in PEER_BACKENDS if b in backends]
    if device.type == "cuda" and set(backends) == {"reference", "triton"}:
        found.append(("reference", "reference"))
    return found


def _grid_options(name: str, grid: tuple[int, int]) -> dict:
    if "kernel_size" not in kernels.family(name).options:
        return {}
    return {"kernel_size": WINDOW_KERNEL.get(tuple(grid), kernels.family(name).options["kernel_size"])}


def _cases(name: str, cfg: BenchConfig, grid: tuple[int, int]) -> list[tuple[str, Callable]]:
    """(label, fn(q, k, v)) for the family (its module's ``attend``: the op plus its DWC/bias terms)
    and its ``peers``. Empty when the grid is too small for the family."""
    def attend_with(backend):
        module = attention.build(name, dim=cfg.heads * cfg.head_dim, num_heads=cfg.heads, backend=backend,
                                 **BENCH_OPTIONS.get(name, {}), **_grid_options(name, grid))
        module = module.to(cfg.device, cfg.dtype)
        return None if module.needs_dense(grid) else (lambda q, k, v: module.attend(None, q, k, v, grid, 0))

    measured = [(label, backend) for label, backend in peers(name, cfg.device) if _peer_installed(backend)]
    cases = [(name, attend_with(None))] + [(f"{name}[{label}]", attend_with(backend)) for label, backend in measured]
    return [(label, fn) for label, fn in cases if fn is not None]


def _peer_installed(backend: str) -> bool:
    """False (and said once) for a peer whose package is missing, e.g. natten, which has no wheel for every
    torch: the bench then measures the rest instead of stopping."""
    if backend in PEER_PACKAGES and importlib.util.find_spec(PEER_PACKAGES[backend]) is None:
        if backend not in _SKIPPED:
            _SKIPPED.add(backend)
            tqdm.write(f"bench: peer {backend!r} skipped: the {PEER_PACKAGES[backend]} package is not installed")
        return False
    return True


def bench_families(cfg: BenchConfig) -> list[dict]:
    """One row per (family, size); the baseline (SDPA) is measured first in each size."""
    if cfg.cuda_graph and cfg.device.type != "cuda":
        raise ValueError(f"--cuda-graph replays CUDA graphs and needs a CUDA device, got {cfg.device}")
    families = [BASELINE] + [f for f in cfg.families if f != BASELINE]
    rows = []
    jobs = [(size, name) for size in cfg.sizes for name in families]
    for (b, gh, gw), name in tqdm(jobs, desc="bench", unit="case"):
        n = gh * gw
        q, k, v = (torch.randn(b, cfg.heads, n, cfg.head_dim, device=cfg.device, dtype=cfg.dtype)
                   for _ in range(3))
        for label, fn in _cases(name, cfg, (gh, gw)):
            rows.append(dict(family=label, batch=b, grid=f"{gh}x{gw}", tokens=n,
                             dtype=str(cfg.dtype).split(".")[-1], device=_device_name(cfg.device),
                             **_measure(fn, q, k, v, cfg)))
    for r in rows:
        base = next(x for x in rows if x["family"] == BASELINE and x["grid"] == r["grid"] and x["batch"] == r["batch"])
        for key in ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph"):
            if f"{key}_ms" in r:
                r[f"speedup_{key}"] = base[f"{key}_ms"] / r[f"{key}_ms"]
    return rows


def _measure(fn: Callable, q, k, v, cfg: BenchConfig) -> dict:
    """Median ms forward and forward+backward, peak MiB of the forward (and with ``cfg.cuda_graph`` both
    replayed from a CUDA graph: the GPU time alone); NaN for what a peer cannot do (natten has no backward
    on CPU), so the row still shows that it was tried."""
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    forward = lambda: fn(q, k, v)  # noqa: E731
    forward_backward = lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad, allow_unused=True)  # noqa: E731
    timed = lambda call: _or_nan(lambda: median_ms(call(), cfg.device, cfg.repeats, cfg.warmup))  # noqa: E731
    row = dict(fwd_ms=timed(lambda: forward), fwd_bwd_ms=timed(lambda: forward_backward),
               peak_mib=_or_nan(lambda: peak_memory_bytes(forward, cfg.device) / 2**20))
    if cfg.cuda_graph:
        row.update(fwd_graph_ms=timed(lambda: cuda_graphed(forward, cfg.device)),
                   fwd_bwd_graph_ms=timed(lambda: cuda_graphed(forward_backward, cfg.device)))
    return row


def _or_nan(measure: Callable[[], float]) -> float:
    try:
        return measure()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        tqdm.write(f"bench: skipped one measurement: {e.__class__.__name__}: {str(e).splitlines()[0][:120]}")
        return float("nan")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


BENCH_COLUMNS = [("family", "family", "s"), ("batch", "B", "d"), ("grid", "grid", "s"), ("tokens", "N", "d"),
                 ("dtype", "dtype", "s"), ("fwd_ms", "fwd ms", ".3f"), ("fwd_bwd_ms", "fwd+bwd ms", ".3f"),
                 ("peak_mib", "peak MiB", ".1f"), ("speedup_fwd", "x SDPA fwd", ".2f"),
                 ("speedup_fwd_bwd", "x SDPA fwd+bwd", ".2f")]
GRAPH_COLUMNS = [("fwd_graph_ms", "graph fwd ms", ".3f"), ("fwd_bwd_graph_ms", "graph fwd+bwd ms", ".3f"),
                 ("speedup_fwd_graph", "x SDPA graph fwd", ".2f"), ("speedup_fwd_bwd_graph", "x SDPA graph fwd+bwd", ".2f")]


def save_plot(rows: list[dict], path: Path, title: str) -> None:
    """Two log-log panels, forward and forward+backward milliseconds against tokens, a line per family."""
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    families = list(dict.fromkeys(r["family"] for r in rows))
    colors = dict(zip(families, matplotlib.colormaps["tab20"].colors))
    ticks = {float(r["tokens"]): f"{r['grid']} B{r['batch']}" for r in rows}     # a labelled tick per measured size
    for ax, key, label in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for family in families:
            pts = sorted((float(r["tokens"]), float(r[key])) for r in rows if r["family"] == family)
            # the baseline black and dashed, peers (natten, flex, reference) dotted
            style = (dict(color="black", linestyle="--") if family == BASELINE else
                     dict(color=colors[family], linestyle=":" if "[" in family else "-"))
            ax.plot(*zip(*pts), marker="o", label=family if family != BASELINE else "softmax (SDPA)", **style)
        ax.set(xscale="log", yscale="log", xlabel="tokens N (grid H x W)", ylabel="ms (median)", title=label)
        ax.set_xticks(list(ticks), [f"{size}\nN={tokens:,.0f}" for tokens, size in ticks.items()])
        ax.xaxis.set_minor_locator(NullLocator())     # minor labels overlap on a short range
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench(cfg: BenchConfig, out_dir: Path) -> list[dict]:
    """Measure, print the table, save ``bench.csv`` and ``bench.png`` under ``out_dir``."""
    rows = bench_families(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_csv(rows, out_dir / "bench.csv")
    title = (f"subquad bench: {rows[0]['device']}, {rows[0]['dtype']}, heads={cfg.heads}, d={cfg.head_dim}, "
             f"median of {cfg.repeats}")
    save_plot(rows, out_dir / "bench.png", title)
    print(title)
    print(format_table(rows, BENCH_COLUMNS + GRAPH_COLUMNS * cfg.cuda_graph))
    print(f"saved {out_dir / 'bench.csv'} and {out_dir / 'bench.png'}")
    return rows


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """"1x32x32,4x64x48" -> [(1, 32, 32), (4, 64, 48)] as (batch, H, W)."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a size is BxHxW with positive integers, e.g. 1x32x32; got {item!r}")
        sizes.append(tuple(int(p) for p in parts))
    return sizes
