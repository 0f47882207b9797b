"""Measuring a call: its median time (wall clock with device syncs, or Triton's ``do_bench`` for the CUDA
kernel suites) and its peak memory (CUDA's allocator statistics, or on CPU a dispatch mode that watches
tensors)."""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return timed_ms(fn, device, repeats, warmup)[0]


def timed_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, spread) of the wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls; the spread is
    the interquartile range (quartiles interpolated within the sample) over the median, 0 for fewer than 4
    repeats: a row whose spread is large was not timed in steady state (a shared or throttled host, another
    process on the GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    if len(times) < 4:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (q3 - q1) / median


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def cuda_graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` (on fixed inputs) captured into one CUDA graph, after warm-up calls on a side stream (kernels
    compiled, caches filled); the returned replay issues all its work at once. One side stream per device for
    every capture: cuBLAS keeps a workspace per stream, which would add to every later row's peak memory."""
    stream = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench`` (CUDA; 25 ms warm-up, 100 ms of repeats)."""
    from triton.testing import do_bench     # triton is a Linux-only dependency: the CPU suites run without it
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


class _LiveStorageBytes(TorchDispatchMode):
    """After every op, sums the storages of the tensors made inside the mode that are still alive.

    Storages held only by autograd's saved tensors are not seen, so use it on forward passes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[weakref.ref] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tensors += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        alive = [t for t in (r() for r in self.tensors) if t is not None]
        self.tensors = [weakref.ref(t) for t in alive]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        self.peak = max(self.peak, sum(storages.values()))
        return out


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.no_grad(), _LiveStorageBytes() as mode:
        fn()
    return mode.peak
