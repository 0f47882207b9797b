"""Dense softmax attention: softmax(q k^T / sqrt(d)) v (Vaswani et al., 2017, Eq. 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.alignment import rows_aligned
from ..core.dispatch import records_grad
from ..core.heads_last import cat_tokens
from ..core.precision import compute_dtype


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Explicit softmax attention in at least float32 (the brute-force ground truth)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (t.to(compute_dtype(q)) for t in (q, k, v))
    scores = (qf * scale) @ kf.transpose(-2, -1)
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


def softmax_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention: the baseline every figure is compared with (inputs whose rows
    are not 16-byte aligned copied first, ``rows_aligned``)."""
    return F.scaled_dot_product_attention(*rows_aligned(q, k, v), scale=scale)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward passes the gradient on in contiguous memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def prefix_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of a few prefix queries (cls tokens) over all keys, as the sparse families attend them, with the
    output's gradient made contiguous: a model's gradient arrives in the heads-last layout (a view of the
    (B, N, h*d) gradient), and cuDNN's SDPA backward on an H200 returned a wrong dq for a one-query slice of it
    (relative error 0.9; contiguous, the usual 3e-3 of bf16). Inputs whose rows are not 16-byte aligned are copied
    first (``rows_aligned``)."""
    return _ContiguousGrad.apply(F.scaled_dot_product_attention(*rows_aligned(q, k, v)))


def with_prefix_queries(grid_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        num_prefix: int) -> torch.Tensor:
    """A sparse family's output for the grid queries (B, h, N - P, d) with the P prefix queries' output
    (``prefix_attention_sdpa``, dense over all keys) before it, in the heads-last layout."""
    if num_prefix == 0:
        return grid_out
    return cat_tokens(prefix_attention_sdpa(q[:, :, :num_prefix], k, v), grid_out)


PREFIX_ROWS_PER_STEP = 64       # prefix queries per step of prefix_queries_backward: (B, h, 64, N) float32 scores


def prefix_queries_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a few prefix queries' dense attention O = softmax(q k^T scale) v over all keys, in float32,
    from their output gradient ``do`` and output ``o`` (B, h, P, dv): (dq (B, h, P, d), the keys' and values' shares
    dk, dv (B, h, N, d)). With P = softmax(S): dv = P^T do, dS = P (do v^T - rowsum(do o)), dq = dS k scale,
    dk = dS^T q scale; the probabilities are recomputed, ``PREFIX_ROWS_PER_STEP`` queries at a time (many prefix
    tokens, such as a text prompt's, never hold a P x N matrix)."""
    kf, vf = k.float(), v.float()
    dq, dk, dv = [], torch.zeros_like(kf), torch.zeros_like(vf)
    for start in range(0, q.shape[2], PREFIX_ROWS_PER_STEP):
        rows = slice(start, start + PREFIX_ROWS_PER_STEP)
        qf, dof = q[:, :, rows].float(), do[:, :, rows].float()
        probs = ((qf @ kf.transpose(-2, -1)) * scale).softmax(dim=-1)                      # (B, h, rows, N)
        ds = probs * (dof @ vf.transpose(-2, -1) - (dof * o[:, :, rows].float()).sum(-1, keepdim=True))
        dq.append((ds @ kf) * scale)
        dk += (ds.transpose(-2, -1) @ qf) * scale
        dv += probs.transpose(-2, -1) @ dof
    return torch.cat(dq, 2), dk, dv


def add_prefix_queries_gradients(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, do: torch.Tensor,
                                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                 num_prefix: int) -> None:
    """In place, for an op whose output holds the prefix queries' rows (``fill_prefix_queries`` in its forward):
    their gradients (``prefix_queries_backward`` of the first ``num_prefix`` rows of do, q, o, at SDPA's default
    scale 1 / sqrt(d) as the forward's) written into dq's first rows, their keys' and values' shares added to dk,
    dv."""
    if num_prefix == 0:
        return
    p = num_prefix
    dq_prefix, dk_prefix, dv_prefix = prefix_queries_backward(do[:, :, :p], q[:, :, :p], k, v, o[:, :, :p],
                                                              q.shape[-1] ** -0.5)
    dq[:, :, :p] = dq_prefix
    dk += dk_prefix
    dv += dv_prefix


def fill_prefix_queries(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        num_prefix: int) -> torch.Tensor:
    """A block-sparse core's output (B, h, N, d), its grid rows computed, with the P prefix queries' output
    (dense over all keys, by SDPA) in its first rows: written there in place when no gradient is recorded (a copy
    of P rows), else ``with_prefix_queries``' concatenation (the core's backward keeps its output as it was)."""
    if num_prefix == 0:
        return out
    if records_grad(q, k, v):
        return with_prefix_queries(out[:, :, num_prefix:], q, k, v, num_prefix)
    out[:, :, :num_prefix] = F.scaled_dot_product_attention(*rows_aligned(q[:, :, :num_prefix], k, v))
    return out
