"""Every Triton kernel the ops launch also compiles for Hopper (sm_90), checked without a GPU: each op runs a small
bf16 case forward and backward on the CPU interpreter while its launches are recorded (kernel, argument types,
constexprs, warps and stages), then a process without the interpreter compiles each recorded kernel with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (Triton's own ptxas; no device needed). The interpreter
runs what a GPU would not compile (a shape, a layout or an op Triton rejects only when lowering): this catches
it on a CPU-only machine."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from subquad import kernels
from subquad.kernels.block_sparse.layout import block_mask_to_csr
from subquad.kernels.core.dispatch import INTERPRET

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not INTERPRET or "triton" not in kernels.available_backends("loglinear_attention"),
                                reason="records launches on the Triton interpreter")

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _cases() -> None:
    """Forward and backward of every Triton op on a small case."""
    g = torch.Generator().manual_seed(0)
    qkv = lambda b, h, n, d: [torch.randn(b, h, n, d, generator=g).bfloat16().requires_grad_() for _ in range(3)]  # noqa: E731

    def run(fn, *inputs):
        out = fn(*inputs)
        torch.autograd.grad(out, [x for x in inputs if x.requires_grad], torch.randn_like(out))

    grid = (12, 16)
    n = 1 + math.prod(grid)
    run(lambda q, k, v: kernels.loglinear_attention(q, k, v, grid=(20, 24), num_prefix=1, backend="triton",
                                                    top_k=(3, 2)), *qkv(1, 2, 1 + 20 * 24, 32))
    run(lambda q, k, v: kernels.radial_attention(q, k, v, grid=grid, num_prefix=1, backend="triton"), *qkv(1, 2, n, 32))
    run(lambda q, k, v: kernels.neighborhood_attention(q, k, v, grid=grid, kernel_size=5, num_prefix=1,
                                                       backend="triton"), *qkv(1, 2, n, 32))
    run(lambda q, k, v: kernels.mala_attention(q, k, v, grid=grid, num_prefix=1, backend="triton"), *qkv(1, 2, n, 32))
    run(lambda q, k, v: kernels.focused_linear_attention(q, k, v, grid=grid, num_prefix=1, backend="triton"),
        *qkv(1, 2, n, 32))
    run(lambda q, k, v: kernels.agent_attention(q, k, v, grid=grid, num_agents=16, num_prefix=1, backend="triton"),
        *qkv(1, 2, n, 32))
    x = torch.randn(1, 2, n, 32, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(64, 1, 3, 3, generator=g).requires_grad_()
    run(lambda x, w: kernels.depthwise_conv_on_grid(x, w, None, grid=grid, num_prefix=1, backend="triton"), x, weight)
    row_ptr, col_idx = block_mask_to_csr(torch.rand(1, 2, 4, 4, generator=g) < 0.6)
    masks = torch.randint(-2**31, 2**31 - 1, (3, 32, 1), generator=g, dtype=torch.int32)
    mask_idx = torch.randint(-1, 3, col_idx.shape, generator=g, dtype=torch.int32)
    run(lambda q, k, v: kernels.block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=32,
                                                       block_n=32, num_prefix=3, tile_mask_idx=mask_idx,
                                                       tile_masks=masks, backend="triton"), *qkv(1, 2, 128, 64))


def _record(monkeypatch) -> list[dict]:
    """The distinct launches of ``_cases``: kernel module and name, argument types, constexprs and options."""
    from triton.runtime.interpreter import InterpretedFunction
    seen, launches = set(), []
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        launch = dict(module=self.fn.__module__, name=self.fn.__name__,
                      types={names[i]: _arg_type(a) for i, a in enumerate(args)},
                      constexprs={k: v for k, v in kwargs.items() if k in names},
                      options={k: v for k, v in kwargs.items() if k not in names})
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    _cases()
    return launches


COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = []
    for launch in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
        names = [p.name for p in kernel.params]
        constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.name not in
                         launch["constexprs"]}, **launch["constexprs"]}
        signature = {n: "constexpr" if n in constexprs else launch["types"][n] for n in names}
        source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception as e:
            failures.append(f"{launch['module']}.{launch['name']} {launch['constexprs']}: {type(e).__name__}: {e}")
    print(json.dumps(failures))
""")


def test_every_launched_kernel_compiles_for_sm90(monkeypatch):
    launches = _record(monkeypatch)
    assert {launch["name"] for launch in launches} >= {"_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel",
                                                         "_pool_finest_kernel", "_select_children_kernel",
                                                         "_write_kernel", "_spread_pooled_kernel"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(launches), capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
