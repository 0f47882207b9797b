"""compile_constant: one cached build per arguments, in eager mode and under torch.compile."""
from __future__ import annotations

import torch

from subquad.kernels.core.compile_constant import compile_constant

BUILDS = []


@compile_constant
def _ramp(grid: tuple[int, int], scale: int = 1) -> tuple[torch.Tensor, int]:
    BUILDS.append((grid, scale))
    return torch.arange(grid[0] * grid[1]) * scale, grid[0] * grid[1]


def test_eager_calls_share_one_build_whatever_the_argument_types():
    """Hashable arguments reach the cache as they are; a list (unhashable) is made a tuple: the same build, the
    same tensors (no copy per call)."""
    BUILDS.clear()
    first = _ramp((3, 4), scale=2)
    assert _ramp((3, 4), scale=2)[0] is first[0]
    assert _ramp([3, 4], scale=2)[0] is first[0]
    assert BUILDS == [((3, 4), 2)]
    assert torch.equal(first[0], torch.arange(12) * 2) and first[1] == 12


def test_compiled_caller_takes_the_build_as_a_constant():
    BUILDS.clear()
    fn = torch.compile(lambda x: x + _ramp((2, 5))[0], fullgraph=True, backend="eager")
    x = torch.randn(10)
    assert torch.equal(fn(x), x + torch.arange(10))
    assert BUILDS == [((2, 5), 1)]
