"""Radial attention's full frames by a dense kernel, the farther windows on the block-sparse core (inference).

In the ``frames`` layout on a video grid, a query frame f attends every token of the frames f - 1, f, f + 1 and,
with the sink, frame 0 (Sec. 4: frame distances d <= 1 are dense): on Wan's 21 latent frames 18% of all pairs, most
of the ~22% the mask keeps. Those are dense blocks, which a dense attention kernel (cuDNN on CUDA) computes faster
per pair than the core's tile lists. The frames are gathered into per-frame key windows, attended densely with their
log-sum-exp, and the core then adds the windows of the farther frames to that softmax state (``resume``): the same
pairs as the core alone, one softmax, no merge pass. Forward only: under autograd or ``torch.compile`` the core runs
the whole mask.
"""
from __future__ import annotations

import functools
import math

import torch

from ..block_sparse.layout import csr_from_lists
from ..block_sparse.triton import forward as core_forward
from ..core.compile_constant import compile_constant
from ..core.dispatch import records_grad
from ..core.heads_last import heads_last_empty
from .block_sparse import radial_attention_on_core, radial_core_layout
from .plan import far_key_tiles, radial_plan, tile_size

GATHER_BUDGET = 1 << 29     # elements of one gathered key window tensor (1 GiB in bf16): larger groups are cut


def frame_windows(num_frames: int, sink: bool) -> list[tuple[list[int], list[list[int]]]]:
    """The full key frames of each query frame, grouped by their count: [(query frames, their key frames)]."""
    groups: dict[int, tuple[list[int], list[list[int]]]] = {}
    for f in range(num_frames):
        window = sorted(set(range(max(0, f - 1), min(num_frames, f + 2))) | ({0} if sink else set()))
        frames, windows = groups.setdefault(len(window), ([], []))
        frames.append(f)
        windows.append(window)
    return [groups[n] for n in sorted(groups)]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention (B, h, Nq, d) and its natural log-sum-exp (B, h, Nq) float32: cuDNN's kernel for 16-bit CUDA
    tensors, exact float32 arithmetic elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
        return out, lse.reshape(q.shape[:3])
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return (s.softmax(-1) @ v.float()).to(q.dtype), s.logsumexp(-1)


def _frames(x: torch.Tensor, index: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, h, F * T, d) -> for each row of ``index`` (G, L) its frames side by side: (B * G, h, L * T, d)."""
    y = x.transpose(1, 2).unflatten(1, (num_frames, -1))[:, index]           # (B, G, L, T, h, d), one copy
    return y.flatten(0, 1).flatten(1, 2).transpose(1, 2)


def full_frames_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, sink: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query frame over its full key frames (``frame_windows``): the output (B, h, N, d), stored heads-last, and
    the base-2 log-sum-exp (B, h, N) float32, the core's softmax state."""
    b, h, n, d = q.shape
    out = heads_last_empty(q, b, h, n, v.shape[-1])
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    per_frame = b * h * (n // num_frames) * d
    for frames, windows in frame_windows(num_frames, sink):
        chunk = max(1, GATHER_BUDGET // (per_frame * len(windows[0])))
        for start in range(0, len(frames), chunk):
            index = torch.tensor(windows[start:start + chunk], device=q.device)
            rows = torch.tensor(frames[start:start + chunk], device=q.device)
            o, s = attention_with_lse(_frames(q, rows[:, None], num_frames), _frames(k, index, num_frames),
                                      _frames(v, index, num_frames), scale)
            out.transpose(1, 2).unflatten(1, (num_frames, -1))[:, rows] = \
                o.unflatten(0, (b, -1)).transpose(2, 3)                       # (B, G, T, h, d)
            lse.unflatten(2, (num_frames, -1))[:, :, rows] = s.unflatten(0, (b, -1)).transpose(1, 2) * math.log2(math.e)
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
