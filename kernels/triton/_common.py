"""Helpers shared by the linear-family Triton kernels: tile loads, padding and the N-split policy."""
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl


def pad_dim(n: int) -> int:
    """Padded channel count: a power of two, at least 16 (the smallest tl.dot operand side)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep exact fp32 products; 16-bit inputs use tf32 on fp32 operands (finer than bf16)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_programs_target(device: torch.device) -> int:
    """Programs that fill the device: two per SM on a GPU; a handful under the CPU interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_tokens(batch_heads: int, n: int, block_n: int, target: int, max_tiles: int = 1 << 30) -> Tuple[int, int]:
    """(num_splits, chunk): cut N into chunks of whole tiles so that batch_heads * num_splits programs
    fill the device (small batch, large N) while each chunk spans at most ``max_tiles`` tiles."""
    tiles = triton.cdiv(n, block_n)
    splits = min(tiles, max(triton.cdiv(target, batch_heads), triton.cdiv(tiles, max_tiles)))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(n, chunk), chunk


LAUNCHED: Dict[str, object] = {}


def launch(kernel, grid: Tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), keeping the compiled kernel by name: its n_regs / n_spills feed the
    resource report of bench_linear."""
    LAUNCHED[kernel.__name__] = kernel[grid](*args, **kwargs)


def head_strides(x: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """x (B, h, N, d) with unit stride on d (copied if not) and its (batch, head, token) strides."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1), x.stride(2)


@triton.jit
def load_tile(base, offs_n, offs_c, stride_n, mask_n, mask_c):
    """A (tokens, channels) tile in float32, zero outside the masks."""
    ptrs = base + offs_n[:, None] * stride_n + offs_c[None, :]
    return tl.load(ptrs, mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def store_tile(base, offs_n, offs_c, stride_n, mask_n, mask_c, value):
    ptrs = base + offs_n[:, None] * stride_n + offs_c[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])
