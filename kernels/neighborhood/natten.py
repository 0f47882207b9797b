"""``backend="natten"`` for neighborhood attention: the natten package (Hassani et al.), for
comparison. natten >= 0.20 has no relative position bias, and on CPU it runs only its Flex
backend, forward only, in float32. natten's own additional-KV path does not run on CPU, so the
prefix keys are attended here and the two partial softmaxes merged through their logsumexps.
"""
from __future__ import annotations

import warnings

import torch

from ..core.gathered import with_global_prefix
from ..softmax import softmax_attention_reference


def merge_partial_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                            lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from the attention over each
    (outputs (..., dv) and logsumexps (...))."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]


def neighborhood_attention_natten(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                                  kernel_size: int, dilation: int, rpb: torch.Tensor | None,
                                  num_prefix: int) -> torch.Tensor:
    if rpb is not None:
        raise ValueError("backend='natten': natten >= 0.20 has no relative position bias; "
                         "use backend='reference' or 'flex' with rpb")
    if q.device.type == "cpu" and q.dtype != torch.float32:
        raise ValueError(f"backend='natten' runs only float32 on CPU (its Flex backend), got {q.dtype}")
    import natten  # imported here: it takes seconds and only this backend needs it

    b, h, _, d = q.shape
    height, width = grid

    def attend_grid(qg, kg, vg, kp, vp):
        to_natten = lambda x: x.transpose(1, 2).reshape(b, height, width, h, x.shape[-1])  # noqa: E731
        with warnings.catch_warnings():     # natten's un-compiled Flex call on CPU warns about itself
            warnings.filterwarnings("ignore", message=".*(without torch.compile|return_lse is deprecated).*")
            out, lse = natten.na2d(to_natten(qg), to_natten(kg), to_natten(vg), kernel_size=kernel_size,
                                   dilation=dilation, return_lse=True)
        out = out.reshape(b, height * width, h, -1).transpose(1, 2).float()
        lse = lse.reshape(b, height * width, h).transpose(1, 2).float()
        if kp.shape[2] == 0:
            return out
        scores = (qg.float() * d ** -0.5) @ kp.float().transpose(-2, -1)
        prefix_out = scores.softmax(dim=-1) @ vp.float()
        return merge_partial_attention(out, lse, prefix_out, scores.logsumexp(dim=-1))

    return with_global_prefix(q, k, v, num_prefix, attend_grid, dense=softmax_attention_reference)
