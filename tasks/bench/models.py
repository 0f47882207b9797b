"""``subquad bench --suite models``: whole models as a user builds them with ``timm.create_model``, against
timm's dense model of the same size, measured in the same run.

Per model and case: inference images/s (eval, no grad) and training images/s (forward, cross-entropy,
backward, fused AdamW step on fp32 weights), both under bf16 autocast on CUDA; the peak memory of each; the host
time per block of each (how long one inference forward or training step takes to *issue*, after a sync, divided
by the depth: the Python and launch cost that a GPU-bound model hides and a host-bound one does not; where it
reaches the step's time, the host bounds it); GFLOPs per image from the FLOP counter and the FLOP-ideal speedup
(peer GFLOPs / model GFLOPs). Each case also times the peer with its attention skipped (``attention_skipped``:
SDPA returns v): its ratio to the peer is what any attention could give there at most (Amdahl), the bound the
FLOP-ideal speedup overstates where the blocks' norms, residuals and casts cost as much as the attention. Modes:
``eager`` (always), ``compile``: the same rows for ``torch.compile(model)`` with the compile time (the first calls);
``cuda-graph`` (CUDA only): inference and the whole training step (forward, backward and a capturable fused AdamW
step) each captured into one CUDA graph and replayed, the model's GPU time without its host time.

Cases: DeiT-S at 224² B128, 1024² B4 and 2048² B1 against timm ``deit_small_patch16_224``; the
hierarchical tiny models at 224² B128 against timm ``swin_tiny_patch4_window7_224``. DiT is the ``dit``
suite.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from ..tables import format_table, save_csv
from ..zoo import count_model
from .measure import cuda_graphed, timed_ms

matplotlib.use("Agg")


@dataclass(frozen=True)
class ModelCase:
    """``models`` at ``img_size`` and ``batch`` against the dense timm model ``peer``."""
    label: str
    peer: str
    models: tuple[str, ...]
    img_size: int
    batch: int


# softmax: subquad's own dense DeiT-S (its blocks with SDPA), whose ratio is what the blocks' fused norms give alone
DEIT_SMALL = tuple(f"{f}_deit_small_patch16_224"
                   for f in ("softmax", "agent", "flatten", "mala", "nat", "radial", "llsa"))
HIER_TINY = ("agent_swin_tiny_patch4_window7_224", "flatten_swin_tiny_patch4_window7_224", "agent_pvt_tiny",
             "flatten_pvt_tiny", "nat_tiny", "dinat_tiny", "mavit_tiny")
MODEL_CASES = (
    ModelCase("DeiT-S 224", "deit_small_patch16_224", DEIT_SMALL, 224, 128),
    ModelCase("DeiT-S 1024", "deit_small_patch16_224", DEIT_SMALL, 1024, 4),
    ModelCase("DeiT-S 2048", "deit_small_patch16_224", DEIT_SMALL, 2048, 1),
    ModelCase("Swin-T 224", "swin_tiny_patch4_window7_224", HIER_TINY, 224, 128),
)
NUM_CLASSES = 1000

MODES = ("eager", "compile", "cuda-graph")
MODEL_COLUMNS = [("case", "case", "s"), ("model", "model", "s"), ("mode", "mode", "s"),
                 ("infer_img_s", "infer img/s", ".1f"), ("train_img_s", "train img/s", ".1f"),
                 ("infer_spread", "infer IQR/med", ".2f"), ("train_spread", "train IQR/med", ".2f"),
                 ("infer_peak_gib", "infer peak GiB", ".2f"), ("train_peak_gib", "train peak GiB", ".2f"),
                 ("host_us_per_block", "host µs/block", ".0f"),
                 ("train_host_us_per_block", "train host µs/block", ".0f"),
                 ("gflops", "GFLOPs/img", ".2f"), ("flop_ideal", "FLOP-ideal x", ".2f"),
                 ("speedup_infer", "x peer infer", ".2f"), ("speedup_train", "x peer train", ".2f"),
                 ("compile_s", "compile s", ".1f")]


SKIPPED = " [attention skipped]"       # the peer's row label with ``attention_skipped``


@contextlib.contextmanager
def attention_skipped():
    """Within the block ``F.scaled_dot_product_attention`` returns its values (timm's attention calls it through
    the module attribute): a dense model then costs everything but its attention."""
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: v
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def select_cases(sizes: list[tuple[int, int, int]] | None, cases: tuple[ModelCase, ...] = MODEL_CASES
                 ) -> tuple[ModelCase, ...]:
    """The cases whose (batch, H, W) is one of ``sizes`` (all for None); a size no case has becomes a DeiT-S case
    at that size and batch (square images only: the DeiT-S cases resize one ``img_size``)."""
    if not sizes:
        return cases
    picked = []
    for batch, h, w in sizes:
        if h != w:
            raise ValueError(f"the models suite runs square images; got {batch}x{h}x{w} (give BxSxS)")
        matching = [c for c in cases if (c.batch, c.img_size) == (batch, h)]
        picked += matching or [ModelCase(f"DeiT-S {h}", "deit_small_patch16_224", DEIT_SMALL, h, batch)]
    return tuple(dict.fromkeys(picked))


def case_models(case: ModelCase, models: list[str] | None) -> tuple[str, ...]:
    """The case's subquad models whose name contains one of the substrings ``models`` (all for None)."""
    return tuple(m for m in case.models if not models or any(s in m for s in models))


def _create(name: str, case: ModelCase, device: torch.device) -> torch.nn.Module:
    size = {} if case.img_size == 224 else {"img_size": case.img_size}
    with device:
        return timm.create_model(name, num_classes=NUM_CLASSES, **size)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(model: torch.nn.Module, case: ModelCase, device: torch.device, capturable: bool = False
           ) -> tuple[Callable, Callable]:
    """(inference forward, training step) closures over fixed random inputs; ``capturable``: the optimizer keeps
    its step count on the GPU, so that the training step can be captured into a CUDA graph."""
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (case.batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda", capturable=capturable)

    def infer() -> torch.Tensor:
        with torch.no_grad(), _autocast(device):
            return model(x)

    def train() -> None:
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return infer, train


def _warm_up(fn: Callable[[], object], device: torch.device, seconds: float = 1.0) -> None:
    """Call ``fn`` for ``seconds`` (at least twice): the GPU reaches its clocks and the caches fill, so that the
    first model of a run (the peer) is not timed on a cold device."""
    start = time.perf_counter()
    for calls in itertools.count(1):
        fn()
        _sync(device)
        if calls >= 2 and time.perf_counter() - start > seconds:
            return


def _host_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median time for ``fn()`` to return when the device is idle at its start: the cost of issuing its work."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    _sync(device)
    return sorted(times)[len(times) // 2]


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """The CUDA allocator's peak since the last reset (NaN on CPU, which has no such counter)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def _depth(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "attn") and isinstance(m.attn, torch.nn.Module)) or 1


def measure_model(name: str, case: ModelCase, device: torch.device, repeats: int, mode: str = "eager",
                  skip_attention: bool = False) -> dict:
    """One row: throughput, peak memory, host time per block (and compile time) of ``name`` in ``case``; with
    ``skip_attention`` of the model with its SDPA skipped (``attention_skipped``; no GFLOPs counted)."""
    row = dict(case=case.label, model=name + SKIPPED * skip_attention, mode=mode, batch=case.batch,
               img_size=case.img_size, compile_s=float("nan"))
    with attention_skipped() if skip_attention else contextlib.nullcontext():
        return _measure(name, case, device, repeats, mode, row, count_flops=not skip_attention)


def _measure(name: str, case: ModelCase, device: torch.device, repeats: int, mode: str, row: dict,
             count_flops: bool) -> dict:
    compile = mode == "compile"
    model = None
    try:
        model = _create(name, case, device)
        row["gflops"] = count_model(name, img_size=case.img_size)["gflops"] if count_flops else float("nan")
        depth = _depth(model)
        if compile:
            model = torch.compile(model)
        graphed = mode == "cuda-graph"
        infer, train = _steps(model, case, device, capturable=graphed)
        if compile:
            start = time.perf_counter()
            model.eval()
            infer()
            model.train()
            train()
            _sync(device)
            row["compile_s"] = time.perf_counter() - start
        model.eval()
        _warm_up(infer, device)
        _reset_peak(device)
        if graphed:
            infer = cuda_graphed(infer, device)
        infer_ms, row["infer_spread"] = timed_ms(infer, device, repeats, warmup=2)
        row["infer_peak_gib"] = _peak_gib(device)
        row["host_us_per_block"] = _host_ms(infer, device, repeats) * 1e3 / depth
        row["infer_img_s"] = case.batch / infer_ms * 1e3
        infer = None                # a captured graph's memory pool is freed with it, not counted in training's peak
        model.train()
        _reset_peak(device)
        if graphed:
            train = cuda_graphed(train, device)
        train_ms, row["train_spread"] = timed_ms(train, device, repeats, warmup=2)
        row["train_peak_gib"] = _peak_gib(device)
        row["train_img_s"] = case.batch / train_ms * 1e3
        row["train_host_us_per_block"] = _host_ms(train, device, repeats) * 1e3 / depth
    except Exception as e:          # one model's failure (out of memory, a compile error) costs its row only
        tqdm.write(f"bench models: {name} at {case.label} B{case.batch}: {type(e).__name__}: {str(e)[:300]}")
        nan = float("nan")
        row.update({key: row.get(key, nan) for key in ("gflops", "infer_img_s", "train_img_s", "infer_spread",
                                                         "train_spread", "infer_peak_gib", "train_peak_gib",
                                                         "host_us_per_block", "train_host_us_per_block")},
                   error=type(e).__name__)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def bench_models(cases: tuple[ModelCase, ...] = MODEL_CASES, repeats: int = 10, device: str = "cuda",
                 modes: tuple[str, ...] = ("eager",), models: list[str] | None = None,
                 csv_path: Path | None = None) -> list[dict]:
    """One row per (case, mode, model), the peer first, then the peer with its attention skipped (the bound on
    any attention's gain); ratios to the peer of the same case and mode (``MODES``). ``models`` keeps only the
    subquad models whose name contains one of these strings (``case_models``); ``csv_path`` is rewritten after
    every row, so that an interrupted run keeps what it measured."""
    dev = torch.device(device)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown bench mode {mode!r}; valid: {', '.join(MODES)}")
    if "cuda-graph" in modes and dev.type != "cuda":
        raise ValueError(f"the cuda-graph mode captures CUDA graphs and needs a CUDA device, got {device!r}")
    jobs = [(case, name, mode, skip) for case in cases for mode in modes
            for name, skip in ((case.peer, False), (case.peer, True),
                               *((m, False) for m in case_models(case, models)))]
    rows = []
    for case, name, mode, skip in tqdm(jobs, desc="bench models", unit="model"):
        row = measure_model(name, case, dev, repeats, mode=mode, skip_attention=skip)
        rows.append(row)
        if csv_path is not None:
            save_csv(rows, csv_path)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for r in rows:
        peer = next(p for p in rows if p["case"] == r["case"] and p["mode"] == r["mode"]
                    and p["model"] == next(c.peer for c in cases if c.label == r["case"]))
        r["flop_ideal"] = peer["gflops"] / r["gflops"]
        r["speedup_infer"] = r["infer_img_s"] / peer["infer_img_s"]
        r["speedup_train"] = r["train_img_s"] / peer["train_img_s"]
    return rows


def profile_model(name: str, case: ModelCase, device: torch.device, steps: int = 5, top: int = 12,
                  step: str = "infer") -> list[dict]:
    """Where one ``step`` of ``name`` in ``case`` spends its time: an inference forward (``infer``) or a training
    step (``train``: forward, backward, optimizer), torch.profiler over ``steps`` of them after warm-up; per CUDA
    kernel (per CPU op on the CPU), microseconds per step and per block, calls per step and share of the total;
    the ``top`` largest, then one row for the rest."""
    if step not in ("infer", "train"):
        raise ValueError(f"step is 'infer' or 'train', got {step!r}")
    cuda = device.type == "cuda"
    model = _create(name, case, device).train(step == "train")
    depth = _depth(model)
    fn = dict(zip(("infer", "train"), _steps(model, case, device)))[step]
    _warm_up(fn, device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    spent = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps, e.count / steps)
             for e in prof.key_averages()]
    spent = sorted((x for x in spent if x[1] > 0), key=lambda x: -x[1])
    total = sum(us for _, us, _ in spent)
    rest = spent[top:]
    spent = spent[:top] + ([(f"(the other {len(rest)})", sum(x[1] for x in rest), sum(x[2] for x in rest))]
                           if rest else [])
    return [dict(case=case.label, model=name, step=step, kernel=key, us_per_forward=us, us_per_block=us / depth,
                 calls_per_forward=calls, share=us / total) for key, us, calls in spent]


PROFILE_COLUMNS = [("model", "model", "s"), ("step", "step", "s"), ("kernel", "kernel (CUDA) or op (CPU)", "s"),
                   ("us_per_block", "µs/block", ".1f"), ("calls_per_forward", "calls", ".0f"),
                   ("share", "share", ".2f")]


def run_models_profile(out_dir: Path, cases: tuple[ModelCase, ...] = MODEL_CASES, models: list[str] | None = None,
                       device: str = "cuda", steps: tuple[str, ...] = ("infer", "train")) -> list[dict]:
    """``profile_model`` for each case's peer and models, inference and training step: printed per model and
    saved as ``bench_models_profile.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dev, rows = torch.device(device), []
    jobs = [(case, name, step) for case in cases for name in (case.peer, *case_models(case, models)) for step in steps]
    for case, name, step in tqdm(jobs, desc="profile models", unit="model"):
        these = profile_model(name, case, dev, step=step)
        rows += these
        save_csv(rows, out_dir / "bench_models_profile.csv")
        tqdm.write(f"{name} at {case.label} B{case.batch}, {step}: {sum(r['us_per_block'] for r in these):.0f} "
                   f"µs/block\n" + format_table([{**r, "kernel": r["kernel"][:70]} for r in these], PROFILE_COLUMNS))
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def save_models_plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per case: inference and training throughput of each model as a ratio to its dense peer."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig = Figure(figsize=(4.2 * len(cases), 4.8))
    for ax, case in zip(fig.subplots(1, len(cases), squeeze=False)[0], cases):
        these = [r for r in rows if r["case"] == case]
        labels = [r["model"].replace("_patch16_224", "").replace("_patch4_window7_224", "")
                  + ("" if r["mode"] == "eager" else f" ({r['mode']})") for r in these]
        pos = range(len(these))
        ax.barh([p - 0.2 for p in pos], [r["speedup_infer"] for r in these], height=0.4, label="inference")
        ax.barh([p + 0.2 for p in pos], [r["speedup_train"] for r in these], height=0.4, label="training")
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yticks(list(pos), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="throughput / dense peer", title=f"{case} B{these[0]['batch']}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_models_bench(out_dir: Path, modes: tuple[str, ...] = ("eager",), models: list[str] | None = None,
                     cases: tuple[ModelCase, ...] = MODEL_CASES, repeats: int = 10) -> list[dict]:
    """Measure each case, print the table, save ``bench_models.csv`` and ``bench_models.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_models(cases, repeats=repeats, modes=modes, models=models, csv_path=out_dir / "bench_models.csv")
    save_csv(rows, out_dir / "bench_models.csv")
    title = (f"subquad bench --suite models: {torch.cuda.get_device_name()}, bf16 autocast, "
             f"random weights, same-run ratios to timm's dense model")
    save_models_plot(rows, out_dir / "bench_models.png", title)
    print(format_table(rows, MODEL_COLUMNS))
    print(f"saved {out_dir / 'bench_models.csv'} and {out_dir / 'bench_models.png'}")
    return rows
