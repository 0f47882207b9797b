"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024). Parameter names and shapes follow the official DeiT code so its
checkpoints load unchanged."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..kernels import agent_attention, checks, depthwise_conv_on_grid, family
from ..kernels.core.family import check_options
from .base import GridAttention, small_next_to_activations
from .grid_maps import cached_constant, depthwise_conv, grid_resize_matrix, without_autocast
from .recompute import recomputed_in_backward
from .registry import register


@register("agent")
class AgentAttention(GridAttention):
    """O = softmax(Q A^T / sqrt(d) + B2) softmax(A K^T / sqrt(d) + B1) V + DWC(V)  (Eq. 3-5).

    Options (the paper's defaults): ``num_agents`` = a*a agent tokens pooled from the grid
    queries (49); ``bias_grid``: the grid on which the row/column agent biases are defined (14x14,
    a 224px image at patch 16); ``dwc_kernel_size`` (3). Each bias is a per-head, per-agent 7x7
    map resized to the grid plus row and column terms; prefix tokens get their own term, unless
    ``prefix_bias=False`` (the official Agent-Swin/PVT, which have no prefix tokens).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_agents: int = 49,
                 bias_grid: int | tuple[int, int] = 14, dwc_kernel_size: int = 3, prefix_bias: bool = True,
                 **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        name = type(self).__name__
        check_options(family("agent"), dict(num_agents=num_agents), name)
        gh, gw = checks.check_ints(bias_grid, "bias_grid", name, lengths=(2,), scalar=True)
        dwc_kernel_size = checks.check_int(dwc_kernel_size, "dwc_kernel_size", name, odd=True)
        prefix_bias = checks.check_bool(prefix_bias, "prefix_bias", name)
        h, n = self.num_heads, checks.as_int(num_agents)
        self.num_agents, self.bias_grid = n, (gh, gw)
        self.dwc = depthwise_conv(dim, dwc_kernel_size)
        self.an_bias = nn.Parameter(torch.zeros(h, n, 7, 7))        # agent -> grid token, 2D map
        self.na_bias = nn.Parameter(torch.zeros(h, n, 7, 7))        # grid token -> agent, 2D map
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n, gh, 1))    # agent -> row
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n, 1, gw))    # agent -> column
        self.ha_bias = nn.Parameter(torch.zeros(1, h, gh, 1, n))    # row -> agent
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, gw, n))    # column -> agent
        if prefix_bias:
            self.ac_bias = nn.Parameter(torch.zeros(1, h, n, 1))    # agent -> prefix token
            self.ca_bias = nn.Parameter(torch.zeros(1, h, 1, n))    # prefix token -> agent
        else:
            self.register_buffer("ac_bias", torch.zeros(1, h, n, 1), persistent=False)
            self.register_buffer("ca_bias", torch.zeros(1, h, 1, n), persistent=False)
        self.init_weights()
        self.to(**self.factory_kwargs)

    def init_weights(self) -> None:
        for p in self.parameters(recurse=False):
            nn.init.trunc_normal_(p, std=0.02)

    def agent_bias(self, grid: tuple[int, int], num_prefix: int, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B1 (h, n, N), B2 (h, N, n)) for this grid: maps and row/column terms resized to it (kept for
        inference where small next to an activation of ``activation`` elements: ``cached_for_inference``)."""
        return self.cached_for_inference("agent_bias", (grid, num_prefix), self._bias_params(),
                                         lambda: self._resize(self._terms(activation), grid, num_prefix), activation)

    def _bias_params(self) -> tuple[torch.Tensor, ...]:
        return (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias, self.ac_bias,
                self.ca_bias)

    def _bias_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_to (h n, K), T_from^T (h, K, n)), K = 49 + gh0 + gw0 + 1: each (head, agent)'s [7x7 map, row terms,
        column terms, prefix term] in float32 or wider, laid out for the products of ``_b1`` and ``_b2``."""
        h, n = self.num_heads, self.num_agents
        dtype = torch.promote_types(self.an_bias.dtype, torch.float32)
        to_grid = torch.cat([self.an_bias.reshape(h, n, -1), self.ah_bias.reshape(h, n, -1),
                             self.aw_bias.reshape(h, n, -1), self.ac_bias.reshape(h, n, 1)], -1).to(dtype)
        from_grid = torch.cat([self.na_bias.reshape(h, n, -1), self.ha_bias.reshape(h, -1, n).transpose(1, 2),
                               self.wa_bias.reshape(h, -1, n).transpose(1, 2), self.ca_bias.reshape(h, n, 1)],
                              -1).to(dtype)
        return to_grid.reshape(h * n, -1), from_grid.transpose(1, 2).contiguous()

    def _terms(self, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_bias_terms``, kept for inference (a few thousand values): a call then resizes them in two products."""
        return self.cached_for_inference("agent_bias_terms", (), self._bias_params(), self._bias_terms, activation)

    def _resize(self, terms: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int], num_prefix: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        operator = self._bias_operator(grid, num_prefix, terms[0])
        return self._b1(terms[0], operator), self._b2(terms[1], operator)

    def _b1(self, to_grid: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
        """B1 = T_to R, (h, n, P + N) in the biases' dtype (computed in float32 or wider, also under autocast)."""
        with without_autocast(to_grid.device):
            return (to_grid @ operator).view(self.num_heads, self.num_agents, -1).to(self.an_bias.dtype)

    def _b2(self, from_grid: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
        """B2 = R^T T_from^T, (h, P + N, n) contiguous, as the kernels read it."""
        with without_autocast(from_grid.device):
            return torch.bmm(operator.T.expand(self.num_heads, -1, -1), from_grid).to(self.an_bias.dtype)

    def _resized_bias(self, grid: tuple[int, int], num_prefix: int
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[Callable, Callable]]:
        """((B1, B2), how to rebuild each) with autograd: both biases as matrix products of their terms with
        ``_bias_operator`` R (bilinear / linear resizing and the sums, a constant of the grid), B1 = T_to R,
        B2 = R^T T_from^T. The rebuilders recompute them from detached terms (a few hundred KB, against 2 h n N
        values), so that training need not keep the biases for the backward (``recomputed_in_backward``)."""
        to_grid, from_grid = self._bias_terms()
        operator = self._bias_operator(grid, num_prefix, to_grid)
        kept_to, kept_from = to_grid.detach(), from_grid.detach()
        return ((self._b1(to_grid, operator), self._b2(from_grid, operator)),
                (lambda: self._b1(kept_to, operator), lambda: self._b2(kept_from, operator)))

    def _bias_operator(self, grid: tuple[int, int], num_prefix: int, like: torch.Tensor) -> torch.Tensor:
        """(49 + gh0 + gw0 + 1, num_prefix + gh * gw): column p + (r * gw + c) holds the weights of the map
        (bilinear: R_h[r] x R_w[c]), of the row terms (R_rows[r]) and of the column terms (R_cols[c]) at grid
        token (r, c); a prefix column picks the prefix term. The row terms resize as a (gh0, 1) map, the column
        terms as a (1, gw0) map (resizing a length-1 axis repeats it)."""
        (gh, gw), (gh0, gw0) = grid, self.bias_grid

        def build() -> torch.Tensor:
            prefix = like.new_zeros(num_prefix + gh * gw, 1)
            prefix[:num_prefix] = 1
            return torch.cat([grid_resize_matrix(src, grid, num_prefix, like)
                              for src in ((7, 7), (gh0, 1), (1, gw0))] + [prefix], 1).T.contiguous()
        return cached_constant(("agent_bias", grid, num_prefix, self.bias_grid), like, build)

    def attend(self, x, q, k, v, grid, num_prefix):
        grid = checks.check_image_grid(grid, "agent attention")
        activation = q.shape[0] * q.shape[2] * self.dim
        bias, rebuild = (self._resized_bias(grid, num_prefix) if torch.is_grad_enabled()
                         else (self.agent_bias(grid, num_prefix, activation), ()))
        if small_next_to_activations(sum(b.numel() for b in bias), activation):
            rebuild = ()        # kept for the backward, not rebuilt: the two products and the hooks cost more host time
        with recomputed_in_backward(*zip(bias, rebuild)):
            y = agent_attention(q, k, v, grid=grid, num_agents=self.num_agents, agent_bias=bias,
                                num_prefix=num_prefix, backend=self.backend)
        return depthwise_conv_on_grid(v, self.dwc.weight, self.dwc.bias, grid=grid, num_prefix=num_prefix, residual=y,
                                      backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_agents={self.num_agents}, bias_grid={self.bias_grid}"
