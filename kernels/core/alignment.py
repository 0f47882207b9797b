"""The byte alignment of the rows of (B, h, N, ...) tensors: what 16-byte vector accesses may assume."""
from __future__ import annotations

import torch


def row_alignment(*tensors: torch.Tensor) -> int:
    """The bytes (a power of two, at most 16) dividing the address of every (batch, head, token) row of each
    (B, h, N, ...) tensor: the lowest set bit of 16, its data pointer and its first three strides in bytes (OR-ed:
    the element size is a power of two). For kernels that state it with ``tl.multiple_of`` (``row_ptrs``) where
    Triton cannot derive it (a stride not divisible by 16, a row pointer chosen from two tensors): 16-byte
    vector accesses and asynchronous copies need it. Called per launch: a few Python operations per tensor."""
    bits = 16
    for x in tensors:
        s = x.stride()
        bits |= x.data_ptr() | (s[0] | s[1] | s[2]) * x.element_size()
    return bits & -bits


def rows_aligned(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, each copied to a fresh (16-byte aligned) contiguous tensor where its rows are not 16-byte
    aligned: SDPA's fused CUDA kernels pick 16-byte vector loads from the strides and the head dim and do not
    check the data pointer (a view that starts an odd number of 16-bit values into its allocation faults with a
    misaligned address, torch 2.11). Under ``torch.compile`` the tensors as they are (no data pointer to read;
    the compiled graph checks its inputs' alignment itself)."""
    if torch.compiler.is_compiling():
        return tensors
    return tuple(x if row_alignment(x) == 16 else x.clone(memory_format=torch.contiguous_format) for x in tensors)
