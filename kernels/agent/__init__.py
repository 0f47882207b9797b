"""Agent attention (Han et al., "Agent Attention", ECCV 2024): n = a*a agent tokens pooled from the
grid queries aggregate the values and broadcast them back, O(N n)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core import checks
from ..core.dispatch import (TRITON, TRITON_DTYPES, choose_backend, dtypes, empty_output, register_backend,
                             triton_device)
from ..core.family import Family, register_family
from .reference import agent_attention_reference


def check_agent_options(options: Mapping[str, Any], op: str) -> None:
    """``num_agents``: a perfect square int >= 1."""
    if "num_agents" in options:
        checks.check_perfect_square(options["num_agents"], "num_agents", op)


FAMILY = register_family(Family(
    name="agent", title="agent attention", paper="Han et al., ECCV 2024", cost="O(N n)", op="agent_attention",
    options={"num_agents": 49}, grid_ranks=(2,), training_free=True, check=check_agent_options))


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                    num_agents: int = 49, agent_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
                    num_prefix: int = 0, backend: str | None = None) -> torch.Tensor:
    """Agent attention (Eq. 3-5): n = a*a agents pooled from the grid queries.

    ``agent_bias``: None or (B1, B2) with B1 (heads, n, N) added to the agent-aggregation scores and
    B2 (heads, N, n) added to the agent-broadcast scores. Backends: ``reference``, ``triton`` (the
    default on CUDA).
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "agent_attention")
    grid = checks.check_image_grid(grid, "agent_attention")
    num_agents = checks.check_perfect_square(num_agents, "num_agents", "agent_attention") ** 2
    if agent_bias is not None:
        h, n, big_n = q.shape[1], num_agents, q.shape[2]
        if tuple(agent_bias[0].shape) != (h, n, big_n) or tuple(agent_bias[1].shape) != (h, big_n, n):
            raise ValueError(
                f"agent_bias must be ((heads, n, N), (heads, N, n)) = (({h}, {n}, {big_n}), ({h}, {big_n}, {n})), "
                f"got ({tuple(agent_bias[0].shape)}, {tuple(agent_bias[1].shape)})")
    fn = choose_backend("agent_attention", backend, q, v=v, grid=grid)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    return fn(q, k, v, grid, num_agents, agent_bias, num_prefix)


if TRITON:
    from .triton import agent_attention_triton
    register_backend("agent_attention", "triton", agent_attention_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES)))
register_backend("agent_attention", "reference", agent_attention_reference)
