"""Every Triton kernel the ops launch also compiles for Hopper (sm_90), checked without a GPU: each op runs a small
bf16 case forward and backward on the CPU interpreter while its launches are recorded (kernel, each argument's type
and the JIT's specialisation of it: an int equal to 1 a constant, 16-divisible ints and 16-byte aligned pointers
marked so, as ``kernel[grid](...)`` would compile them; constexprs, warps and stages), then a process without the
interpreter compiles each recorded kernel with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (Triton's own
ptxas; no device needed). The interpreter runs what a GPU would not compile (a shape, a layout or an op Triton
rejects only when lowering): this catches it on a CPU-only machine. At real sizes (launches recorded with the
kernels' work skipped) LLSA's and radial attention's kernels are also checked for register spills and for 2-byte
scalar global loads and stores in their machine code (``cuobjdump -sass``): a tile read one element per
instruction, as an alignment the compiler cannot see makes it, is several times slower and never pipelined."""
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
from triton.backends.compiler import BaseBackend  # noqa: E402  (after the skip: Triton may be absent)
from triton.runtime.jit import native_specialize_impl  # noqa: E402
pytestmark = pytest.mark.skipif(not INTERPRET or "triton" not in kernels.available_backends("loglinear_attention"),
                                reason="records launches on the Triton interpreter")

def _specialisations(fn, args: tuple, kwargs: dict) -> dict:
    """{argument: [type, specialisation]} of the non-constexpr arguments, as Triton's JIT specialises them
    (``do_not_specialize`` respected)."""
    plain = set((fn.kwargs.get("do_not_specialize") or ()))
    return {name: list(native_specialize_impl(BaseBackend, value, False, name not in plain, True))
            for name, value in zip(fn.arg_names, args) if name not in kwargs}


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


def _real_size_cases() -> None:
    """LLSA at the paper's shapes (head dim 64; 128x128 with two levels, 256x256 with three) and radial attention on
    an image, forward and backward: their launch configurations (block sizes, warps, stages) as on a GPU."""
    for grid in ((128, 128), (256, 256)):
        qkv = [torch.randn(1, 4, math.prod(grid), 64).bfloat16().requires_grad_() for _ in range(3)]
        out = kernels.loglinear_attention(*qkv, grid=grid, backend="triton")
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    qkv = [torch.randn(1, 4, 64 * 64, 64).bfloat16().requires_grad_() for _ in range(3)]
    out = kernels.radial_attention(*qkv, grid=(64, 64), backend="triton")
    torch.autograd.grad(out, qkv, torch.randn_like(out))


def _head_dim_72_cases() -> None:
    """Every op at head dim 72 (DiT-XL/2, PixArt) with q, k, v as the models make them (views of one (B, N, 3, h, d)
    projection: head stride 72, which Triton's JIT does not mark aligned), forward and backward."""
    grid = (16, 16)
    ops = (("radial_attention", {}), ("neighborhood_attention", dict(kernel_size=7)), ("loglinear_attention", {}),
           ("mala_attention", {}), ("focused_linear_attention", {}), ("agent_attention", dict(num_agents=16)))
    for op, options in ops:
        qkv = torch.randn(2, 1 + math.prod(grid), 3, 4, 72).bfloat16().requires_grad_()
        out = getattr(kernels, op)(*qkv.permute(2, 0, 3, 1, 4).unbind(0), grid=grid, num_prefix=1, backend="triton",
                                   **options)
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    x = torch.randn(2, 1 + math.prod(grid), 4, 72).bfloat16().transpose(1, 2).requires_grad_()
    weight = torch.randn(4 * 72, 1, 3, 3).requires_grad_()
    out = kernels.depthwise_conv_on_grid(x, weight, None, grid=grid, num_prefix=1, backend="triton")
    torch.autograd.grad(out, [x, weight], torch.randn_like(out))


def _record(monkeypatch, cases=_cases, run_kernels: bool = True) -> list[dict]:
    """The distinct launches of ``cases``: kernel module and name, argument types, constexprs and options; with
    ``run_kernels`` False the kernels' work is skipped (the launch sequence of a real size, in seconds; outputs
    are left as allocated)."""
    from triton.runtime.interpreter import InterpretedFunction
    seen, launches = set(), []
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        launch = dict(module=self.fn.__module__, name=self.fn.__name__,
                      specs=_specialisations(self, args, kwargs),
                      constexprs={k: v for k, v in kwargs.items() if k in names},
                      options={k: v for k, v in kwargs.items() if k not in names})
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)
        if run_kernels:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    cases()
    return launches


COMPILE = textwrap.dedent("""
    import collections, importlib, json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    failures, spills, narrow = [], {}, {}
    for launch in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
        names = [p.name for p in kernel.params]
        constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.name not in
                         launch["constexprs"]}, **launch["constexprs"]}
        signature, attrs = {}, {}
        for n in names:
            kind, spec = ("constexpr", constexprs[n]) if n in constexprs else launch["specs"][n]
            if kind == "constexpr":         # declared so, or an int the JIT specialised to its value 1
                signature[n], constexprs[n] = "constexpr", spec
                continue
            signature[n] = kind
            if spec == "D":
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()}, attrs)
        name = f"{launch['module']}.{launch['name']} {launch['constexprs']} {launch['options']}"
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if REAL_SIZE:
            with tempfile.TemporaryDirectory() as folder:
                ptx = os.path.join(folder, "kernel.ptx")
                with open(ptx, "w") as f:
                    f.write(compiled.asm["ptx"])
                done = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".cubin"],
                                      capture_output=True, text=True, check=True)
                sass = subprocess.run([cuobjdump, "-sass", ptx + ".cubin"], capture_output=True, text=True,
                                      check=True).stdout
            spills[name] = int(re.search(r"([0-9]+) bytes spill stores", done.stderr).group(1))
            narrow[name] = dict(collections.Counter(re.findall(r"\\b((?:LDG|STG)\\.E\\.[US]16)\\b", sass)))
    print(json.dumps(dict(failures=failures, spills=spills, narrow=narrow)))
""")


def _compile_for_sm90(launches: list[dict], real_size: bool) -> dict:
    """Compile the launches in a process without the interpreter: {"failures": [...], "spills": {launch: bytes of
    spill stores by ptxas -v}, "narrow": {launch: {2-byte global load / store instruction: count in its SASS}}}
    (the last two only for ``real_size``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", f"REAL_SIZE = {real_size}\n" + COMPILE], input=json.dumps(launches),
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_launched_kernel_compiles_for_sm90(monkeypatch):
    launches = _record(monkeypatch)
    assert {launch["name"] for launch in launches} >= {"_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel",
                                                         "_pool_finest_kernel", "_select_kernel",
                                                         "_write_kernel", "_spread_pooled_kernel",
                                                         "_key_tile_lists_kernel"}
    failures = _compile_for_sm90(launches, real_size=False)["failures"]
    assert not failures, "\n".join(failures)


def test_llsa_and_radial_kernels_at_real_sizes_neither_spill_nor_access_scalars(monkeypatch):
    """At the launch configurations of real sizes (head dim 64) no kernel of LLSA or radial attention spills
    registers to local memory on sm_90 (ptxas -v): a spill in a per-round loop (the selection's top-K) costs
    more than the kernel's work; and the block-sparse core, whose tiles each thread reads 8 values of a row at a
    time, loads and stores no 16-bit value alone (a key tile whose row pointers come from two tensors, LLSA's
    tokens and pooled keys, did until their alignment was restated). The pooling's block means are one value
    per thread, stored alone by design."""
    launches = _record(monkeypatch, _real_size_cases, run_kernels=False)
    assert {launch["name"] for launch in launches} >= {"_select_kernel", "_pool_finest_kernel",
                                                         "_spread_pooled_kernel", "_fwd_kernel", "_bwd_kv_kernel",
                                                         "_bwd_q_kernel", "_hot_tiles_kernel"}
    result = _compile_for_sm90(launches, real_size=True)
    assert not result["failures"], "\n".join(result["failures"])
    spilling = {name: size for name, size in result["spills"].items() if size}
    assert not spilling, "\n".join(f"{name}: {size} bytes spilled" for name, size in spilling.items())
    _assert_tiles_accessed_in_vectors(result)


TILE_KERNELS = tuple(f"subquad.kernels.{module}." for module in (
    "block_sparse.triton", "neighborhood.triton", "core.triton_common", "linear.triton", "agent.triton",
    "grid_conv.triton"))


def _assert_tiles_accessed_in_vectors(result: dict) -> None:
    """No 16-bit scalar global load or store in the kernels that read (tokens, channels) tiles (attention cores,
    linear attention, agent attention, the depthwise conv), where each thread reads 8 values of a row at a time."""
    narrow = {name: found for name, found in result["narrow"].items() if found and name.startswith(TILE_KERNELS)}
    assert not narrow, "\n".join(f"{name}: {found}" for name, found in narrow.items())


def test_kernels_read_tiles_in_vectors_at_head_dim_72(monkeypatch):
    """Head dim 72 in the models' q, k, v layout: every row is 16-byte aligned, but no stride is divisible by 16
    (what Triton's JIT marks aligned), so the kernels state the alignment (``row_ptrs``); without it every tile
    access was one 16-bit value per instruction, with hundreds of bytes of register spills."""
    launches = _record(monkeypatch, _head_dim_72_cases, run_kernels=False)
    result = _compile_for_sm90(launches, real_size=True)
    assert not result["failures"], "\n".join(result["failures"])
    _assert_tiles_accessed_in_vectors(result)
