"""Magnitude-aware linear attention (Fan et al., "Rectifying Magnitude Neglect in Linear Attention",
ICCV 2025)."""
from __future__ import annotations

from torch import nn

from ..kernels import checks, depthwise_conv_on_grid, family, mala_attention
from ..kernels.core.family import check_options
from .base import GridAttention
from .grid_maps import depthwise_conv
from .registry import register


@register("mala")
class MagnitudeAwareLinearAttention(GridAttention):
    """Y_i = beta_i phi(q_i) sum_j phi(k_j)^T v_j - gamma_i sum_j v_j with phi = ELU + 1 (Eq. 9-11).

    The MAViT extras are options: ``rope`` (2D RoPE on phi(q), phi(k) inside the KV product),
    ``lepe`` (a depthwise ``lepe_kernel_size`` conv of V added to the output) and ``gate`` (the
    output multiplied by a linear gate of the input before the projection).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, rope: bool = False, lepe: bool = False,
                 lepe_kernel_size: int = 5, gate: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        name = type(self).__name__
        check_options(family("mala"), dict(rope=rope), name)
        lepe, gate = checks.check_bool(lepe, "lepe", name), checks.check_bool(gate, "gate", name)
        lepe_kernel_size = checks.check_int(lepe_kernel_size, "lepe_kernel_size", name, odd=True)
        if rope and self.head_dim % 4:
            raise ValueError(f"{name}(rope=True): 2D RoPE needs head_dim divisible by 4, got head_dim={self.head_dim} "
                             f"(dim={self.dim} / num_heads={self.num_heads})")
        self.rope = bool(rope)
        self.lepe = depthwise_conv(self.dim, lepe_kernel_size) if lepe else None
        self.gate = nn.Linear(self.dim, self.dim) if gate else None
        self.to(**self.factory_kwargs)

    def attend(self, x, q, k, v, grid, num_prefix):
        y = mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=self.rope, backend=self.backend)
        if self.lepe is not None:
            y = depthwise_conv_on_grid(v, self.lepe.weight, self.lepe.bias, grid=grid, num_prefix=num_prefix,
                                       residual=y, backend=self.backend)
        if self.gate is not None:
            b, n, _ = x.shape
            y = y * self.gate(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope={self.rope}, lepe={self.lepe is not None}, gate={self.gate is not None}"
