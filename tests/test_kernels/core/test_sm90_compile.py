"""Every Triton kernel the ops launch also compiles for Hopper (sm_90), checked without a GPU
(``subquad.tasks.bench.machine_code``: launches recorded on the CPU interpreter with the JIT's argument
specialisations, compiled by Triton's own ptxas in a process without the interpreter). The interpreter runs what
a GPU would not compile (a shape, a layout or an op Triton rejects only when lowering): this catches it on a
CPU-only machine. At real sizes (launches recorded with the kernels' work skipped) LLSA's and radial attention's
kernels are also checked for register spills, and every tile-reading kernel for 2-byte scalar global loads and
stores in its machine code: a tile read one element per instruction, as an alignment the compiler cannot see
makes it, is several times slower and never pipelined."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from subquad import kernels
from subquad.kernels.block_sparse.layout import block_mask_to_csr
from subquad.kernels.core.dispatch import INTERPRET

triton = pytest.importorskip("triton")
from subquad.tasks.bench.machine_code import (OPS, compile_for_sm90, narrow_accesses,  # noqa: E402
                                              op_case, recording_launches)
pytestmark = pytest.mark.skipif(not INTERPRET or "triton" not in kernels.available_backends("loglinear_attention"),
                                reason="records launches on the Triton interpreter")


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
    """LLSA at the paper's shapes (head dim 64; 128x128 with two levels, 256x256 with three), radial attention on
    an image and, in inference, on Wan-sized video frames (head dim 128, the full frames as key spans), MALA's 5x5 depthwise conv in a DeiT-S at 224 px (one filter per channel, and FLatten's shared by
    the heads), forward and backward: their launch configurations (block sizes, warps, stages) as on a GPU."""
    for grid in ((128, 128), (256, 256)):
        qkv = [torch.randn(1, 4, math.prod(grid), 64).bfloat16().requires_grad_() for _ in range(3)]
        out = kernels.loglinear_attention(*qkv, grid=grid, backend="triton")
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    qkv = [torch.randn(1, 4, 64 * 64, 64).bfloat16().requires_grad_() for _ in range(3)]
    out = kernels.radial_attention(*qkv, grid=(64, 64), backend="triton")
    torch.autograd.grad(out, qkv, torch.randn_like(out))
    with torch.no_grad():       # Wan's 30x52 latent frames at head dim 128, heads-last: the full frames as key spans
        q, k, v = (t.transpose(1, 2) for t in torch.randn(1, 3 * 30 * 52, 3, 2, 128).bfloat16().unbind(2))
        kernels.radial_attention(q, k, v, grid=(3, 30, 52), decay_factor=0.2, backend="triton")
    x = torch.randn(128, 197, 6, 64).bfloat16().transpose(1, 2).requires_grad_()
    for channels in (6 * 64, 64):
        weight = torch.randn(channels, 1, 5, 5).requires_grad_()
        out = kernels.depthwise_conv_on_grid(x, weight, None, grid=(14, 14), num_prefix=1, backend="triton")
        torch.autograd.grad(out, [x, weight], torch.randn_like(out))


def _head_dim_72_cases() -> None:
    """Every op at head dim 72 (DiT-XL/2, PixArt) with q, k, v as the models make them (views of one (B, N, 3, h, d)
    projection: head stride 72, which Triton's JIT does not mark aligned), forward and backward."""
    grid = (16, 16)
    for op in OPS:
        op_case(op, grid, batch=2, heads=4, head_dim=72, num_prefix=1, layout="projection", backward=True)()
    x = torch.randn(2, 1 + math.prod(grid), 4, 72).bfloat16().transpose(1, 2).requires_grad_()
    weight = torch.randn(4 * 72, 1, 3, 3).requires_grad_()
    out = kernels.depthwise_conv_on_grid(x, weight, None, grid=grid, num_prefix=1, backend="triton")
    torch.autograd.grad(out, [x, weight], torch.randn_like(out))


def _layer_norm_cases() -> None:
    """The fused residual add + LayerNorm as the models call it, forward and backward: DeiT-S at 1024 px (float32
    stream, bf16 sub-layer output), DiT-XL/2's adaLN at 512 px (per-sample parameters and gate), Swin-T's first
    stage (bf16 stream, 96 channels); and the first norm of a block (no add)."""
    for shape, stream, per_sample in (((4, 4097, 384), torch.float32, False), ((8, 1024, 1152), torch.float32, True),
                                      ((8, 56, 56, 96), torch.bfloat16, False)):
        x, y = torch.randn(shape).to(stream).requires_grad_(), torch.randn(shape).bfloat16().requires_grad_()
        params = [torch.randn((shape[0], shape[-1]) if per_sample else shape[-1:]).requires_grad_()
                  for _ in range(3 if per_sample else 2)]
        s, out = kernels.add_layer_norm(x, y, *params[:2], gate=params[2] if per_sample else None,
                                        out_dtype=torch.bfloat16, backend="triton")
        torch.autograd.grad((s, out), [x, y, *params], (torch.randn_like(s), torch.randn_like(out)))
        kernels.add_layer_norm(x, None, *params[:2], out_dtype=torch.bfloat16, backend="triton")


def _record(cases=_cases, run_kernels: bool = True) -> list[dict]:
    """The distinct launches of ``cases`` (``recording_launches``)."""
    with recording_launches(run_kernels) as launches:
        cases()
    return launches


def test_every_launched_kernel_compiles_for_sm90():
    launches = _record()
    assert {launch["name"] for launch in launches} >= {"_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel",
                                                         "_pool_finest_kernel", "_select_kernel",
                                                         "_write_kernel", "_spread_pooled_kernel",
                                                         "_key_tile_lists_kernel", "_prefix_dq_kernel",
                                                         "_prefix_dkdv_kernel"}
    failures = compile_for_sm90(launches, sass=False)["failures"]
    assert not failures, "\n".join(failures)


def test_kernels_at_real_sizes_neither_spill_nor_access_scalars():
    """At the launch configurations of real sizes (head dim 64) no kernel of LLSA, radial attention or the depthwise
    conv spills registers to local memory on sm_90 (ptxas -v): a spill in a per-round loop (the selection's
    top-K, the conv backward's taps) costs more than the kernel's work; and the block-sparse core, whose tiles each thread reads 8 values of a row at a
    time, loads and stores no 16-bit value alone (a key tile whose row pointers come from two tensors, LLSA's
    tokens and pooled keys, did until their alignment was restated). The pooling's block means are one value
    per thread, stored alone by design."""
    launches = _record(_real_size_cases, run_kernels=False)
    assert {launch["name"] for launch in launches} >= {"_select_kernel", "_pool_finest_kernel",
                                                         "_spread_pooled_kernel", "_fwd_kernel", "_bwd_kv_kernel",
                                                         "_bwd_q_kernel", "_hot_tiles_kernel", "_backward_kernel"}
    result = compile_for_sm90(launches)
    assert not result["failures"], "\n".join(result["failures"])
    spilling = {name: kernel["spills"] for name, kernel in result["kernels"].items() if kernel["spills"]}
    assert not spilling, "\n".join(f"{name}: {size} bytes spilled" for name, size in spilling.items())
    _assert_tiles_accessed_in_vectors(result)


TILE_KERNELS = tuple(f"subquad.kernels.{module}." for module in (
    "block_sparse.triton", "neighborhood.triton", "core.triton_common", "linear.triton", "agent.triton",
    "grid_conv.triton", "softmax.prefix_triton"))


def _assert_tiles_accessed_in_vectors(result: dict) -> None:
    """No 16-bit scalar global load or store in the kernels that read (tokens, channels) tiles (attention cores,
    linear attention, agent attention, the depthwise conv), where each thread reads 8 values of a row at a time."""
    narrow = {name: narrow_accesses(kernel["ops"]) for name, kernel in result["kernels"].items()
              if name.startswith(TILE_KERNELS) and narrow_accesses(kernel["ops"])}
    assert not narrow, "\n".join(f"{name}: {found}" for name, found in narrow.items())


def test_kernels_read_tiles_in_vectors_at_head_dim_72():
    """Head dim 72 in the models' q, k, v layout: every row is 16-byte aligned, but no stride is divisible by 16
    (what Triton's JIT marks aligned), so the kernels state the alignment (``row_ptrs``); without it every tile
    access was one 16-bit value per instruction, with hundreds of bytes of register spills."""
    launches = _record(_head_dim_72_cases, run_kernels=False)
    result = compile_for_sm90(launches)
    assert not result["failures"], "\n".join(result["failures"])
    _assert_tiles_accessed_in_vectors(result)


def test_machine_code_report_command():
    """``python -m subquad.tasks.bench.machine_code`` reports each kernel an op launches at the given size; a grid
    that is not HxW or TxHxW is a usage error."""
    done = subprocess.run([sys.executable, "-m", "subquad.tasks.bench.machine_code", "--op", "mala", "--grid", "8x8",
                           "--heads", "2", "--head-dim", "16", "--forward-only"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mala grid 8x8, B 1, 2 heads, d 16, projection layout")
    assert [line.split()[0] for line in lines[1::2]] == ["linear.triton._state_kernel", "linear.triton._output_kernel"]
    assert all(line.strip().startswith("registers ") and "16-bit scalar accesses 0" in line for line in lines[2::2])
    bad = subprocess.run([sys.executable, "-m", "subquad.tasks.bench.machine_code", "--op", "mala", "--grid", "8"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "expected HxW or TxHxW" in bad.stderr


def test_layer_norm_kernels_at_model_sizes_neither_spill_nor_access_scalars():
    """The fused LayerNorm's kernels at the models' widths (384, 1152, 96 channels: tiles of 8 x 512, 2 x 2048 and
    32 x 128 values) keep their rows in registers (no spill on sm_90) and read and write them in vectors."""
    launches = _record(_layer_norm_cases, run_kernels=False)
    assert {launch["name"] for launch in launches} >= {"_add_layer_norm_kernel", "_add_layer_norm_backward_kernel",
                                                         "_param_grads_kernel"}
    result = compile_for_sm90(launches)
    assert not result["failures"], "\n".join(result["failures"])
    found = {name: (kernel["spills"], narrow_accesses(kernel["ops"])) for name, kernel in result["kernels"].items()
             if ".layer_norm." in name and (kernel["spills"] or narrow_accesses(kernel["ops"]))}
    assert not found, "\n".join(f"{name}: {spills} bytes spilled, {narrow}" for name, (spills, narrow) in found.items())
