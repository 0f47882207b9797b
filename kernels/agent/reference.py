"""Agent attention (Han et al., ECCV 2024, Eq. 3-5), plain PyTorch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.precision import compute_dtype


def pool_agents(q: torch.Tensor, grid: tuple[int, int], num_agents: int, num_prefix: int) -> torch.Tensor:
    """Agent tokens A: adaptive average pooling of the grid queries to an a x a grid, (B, h, n, d)."""
    b, h, _, d = q.shape
    a = math.isqrt(num_agents)
    q_grid = q[:, :, num_prefix:].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
    agents = F.adaptive_avg_pool2d(q_grid, (a, a))
    return agents.reshape(b, h, d, num_agents).transpose(-2, -1)


def agent_attention_reference(q, k, v, grid, num_agents, agent_bias, num_prefix):
    """V_A = softmax(A K^T / sqrt(d) + B1) V  (agent aggregation);
    O = softmax(Q A^T / sqrt(d) + B2) V_A  (agent broadcast).

    ``agent_bias`` is None or (B1 of shape (h, n, N), B2 of shape (h, N, n)). At least float32 inside.
    """
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (t.to(compute_dtype(q)) for t in (q, k, v))
    agents = pool_agents(qf, grid, num_agents, num_prefix)
    agg = (agents * scale) @ kf.transpose(-2, -1)            # (B, h, n, N)
    bcast = (qf * scale) @ agents.transpose(-2, -1)          # (B, h, N, n)
    if agent_bias is not None:
        agg = agg + agent_bias[0].to(qf.dtype)
        bcast = bcast + agent_bias[1].to(qf.dtype)
    agent_v = agg.softmax(dim=-1) @ vf                       # (B, h, n, dv)
    return (bcast.softmax(dim=-1) @ agent_v).to(q.dtype)
