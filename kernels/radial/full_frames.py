"""Radial attention's full frames by a dense kernel, the farther windows on the block-sparse core (inference).

In the ``frames`` layout on a video grid, a query frame f attends every token of the frames f - 1, f, f + 1 and,
with the sink, frame 0 (Sec. 4: frame distances d <= 1 are dense): on Wan's 21 latent frames 18% of all pairs, most
of the ~22% the mask keeps. Those are dense blocks, which a dense attention kernel (cuDNN on CUDA) computes faster
per pair than the core's tile lists. They are four batched dense calls on views of q, k, v (no copies): frame f
against frame f + s for s = 0, -1, +1 (the frames as the batch), and frames 2.. against frame 0 (the sink); their
outputs and log-sum-exps are merged into one softmax state (``merge_state``), to which the core then adds the
windows of the farther frames (``resume``): the same pairs as the core alone. Forward only: under autograd or
``torch.compile`` the core runs the whole mask.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..block_sparse.layout import csr_from_lists
from ..block_sparse.triton import forward as core_forward
from ..core.compile_constant import compile_constant
from ..core.dispatch import records_grad
from ..core.heads_last import heads_last_empty
from ..softmax.merge_triton import merge_state
from .block_sparse import radial_attention_on_core, radial_core_layout
from .plan import far_key_tiles, radial_plan, tile_size


class FramePart(NamedTuple):
    """Query frames first_query .. first_query + count - 1, each against key frame first_key + i (``paired``), or
    all against key frame first_key (the sink)."""
    first_query: int
    first_key: int
    count: int
    paired: bool


def full_frame_parts(num_frames: int, sink: bool) -> list[FramePart]:
    """The dense parts that make up the full frames: each frame against itself, the previous and the next frame,
    and the frames from 2 on against the sink (frames 0 and 1 see it already)."""
    parts = [FramePart(0, 0, num_frames, True)]
    if num_frames > 1:
        parts += [FramePart(1, 0, num_frames - 1, True), FramePart(0, 1, num_frames - 1, True)]
    if sink and num_frames > 2:
        parts.append(FramePart(2, 0, num_frames - 2, False))
    return parts


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention (B, h, Nq, d) and its natural log-sum-exp (B, h, Nq) float32: cuDNN's kernel for 16-bit CUDA
    tensors, exact float32 arithmetic elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
        return out, lse.reshape(q.shape[:3])
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return (s.softmax(-1) @ v.float()).to(q.dtype), s.logsumexp(-1)


def _frames(x: torch.Tensor, first: int, count: int, frame_tokens: int) -> torch.Tensor:
    """Frames first .. first + count - 1 of one batch element's (h, N, d) tokens as a batch: (count, h, T, d), a
    view."""
    return x[:, first * frame_tokens:(first + count) * frame_tokens].unflatten(1, (count, frame_tokens)).transpose(0, 1)


def full_frames_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, sink: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query frame over its full key frames (``full_frame_parts``): the output (B, h, N, d), stored heads-last,
    and the base-2 log-sum-exp (B, h, N) float32, the core's softmax state."""
    b, h, n, d = q.shape
    t = n // num_frames
    out = heads_last_empty(q, b, h, n, v.shape[-1])
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    for i in range(b):
        for j, (q0, k0, count, paired) in enumerate(full_frame_parts(num_frames, sink)):
            if paired:
                part = attention_with_lse(_frames(q[i], q0, count, t), _frames(k[i], k0, count, t),
                                          _frames(v[i], k0, count, t), scale)
            else:           # all these query frames' tokens as one row of the batch
                part = attention_with_lse(q[i:i + 1, :, q0 * t:], _frames(k[i], k0, 1, t), _frames(v[i], k0, 1, t),
                                          scale)
            merge_state(out[i], lse[i], *part, q0 * t, init=j == 0)
    return out, lse


@compile_constant
def radial_far_layout(grid: tuple[int, ...], options: tuple,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cached) The core's CSR (row_ptr, col_idx) of ``far_key_tiles`` and the plan's tile rows."""
    far = far_key_tiles(radial_plan(grid, options, device), bool(options[4]))
    return (*csr_from_lists(far[None, None]), radial_core_layout(grid, options, 0, device)[2])


def radial_attention_full_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                                 options: tuple) -> torch.Tensor:
    """Radial attention of the ``frames`` layout on a video grid (no prefix): the full frames by
    ``full_frames_attention``, the farther windows on the core resuming from their softmax state."""
    scale = q.shape[-1] ** -0.5
    out, lse = full_frames_attention(q, k, v, grid[0], bool(options[4]), scale)
    row_ptr, col_idx, tile_rows = radial_far_layout(grid, options, q.device)
    t = tile_size(options)
    core_forward(q, k, v, row_ptr, col_idx, None, None, None, tile_rows, t, t, 0, scale, False, resume=(out, lse))
    return out


@functools.lru_cache(maxsize=None)
def _has_cudnn_attention(index: int) -> bool:
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(index) >= (8, 0)


def takes_full_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], num_prefix: int,
                      options: tuple) -> bool:
    """True where ``radial_attention_full_frames`` serves the call: the frames layout on a video grid without
    prefix, 16-bit CUDA tensors with cuDNN's attention, no autograd, not under ``torch.compile``."""
    return (options[0] == "frames" and len(grid) == 3 and grid[0] > 1 and num_prefix == 0 and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and not records_grad(q, k, v)
            and not torch.compiler.is_compiling()
            and _has_cudnn_attention(q.device.index if q.device.index is not None else torch.cuda.current_device()))


def radial_attention_on_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                               num_prefix: int, options: tuple) -> torch.Tensor:
    """The ``triton`` backend: ``radial_attention_full_frames`` where it serves the call, else the core (Triton)."""
    if takes_full_frames(q, k, v, grid, num_prefix, options):
        return radial_attention_full_frames(q, k, v, grid, options)
    return radial_attention_on_core(q, k, v, grid, num_prefix, options, core_backend="triton")
