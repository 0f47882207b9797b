"""One record per attention family: every table of families (the attention registry, the model
builders, the pipeline accelerator, the benchmark, the CLI help) derives from these records.

Each family folder (``kernels/<family>/__init__.py``) declares its record next to its op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

OptionCheck = Callable[[Mapping[str, Any], str], None]     # check(options, op): ValueError naming a bad one
DenseOn = Callable[..., bool]                               # dense_on(grid, **options): keeps every pair there


@dataclass(frozen=True)
class Family:
    """An attention family.

    ``name``: the canonical name (``attention.build(name)``); ``aliases``: other names for it;
    ``title``/``paper``: what it is and where it comes from; ``cost``: its complexity class;
    ``op``: its functional op in ``subquad.kernels``; ``options``: the op's family options with their
    defaults (None: chosen from the grid); ``grid_ranks``: 2 for image grids (H, W), 3 for video
    grids (T, H, W); ``training_free``: it can replace dense attention in a pretrained model
    without training (the pipeline accelerator offers it); ``check(options, op)``: checks the values
    of the options given (those that need no grid: types and ranges), a ValueError naming the option,
    its value and what is valid (the op runs it on every call, the module and the pipeline
    accelerator when they are built); ``dense_on(grid, **options)``: True where the mechanism would keep
    every pair of the grid (a mask or selection that covers it), so that exact dense attention gives the
    same result faster (the modules and the pipeline accelerator then attend densely).
    """

    name: str
    title: str
    paper: str
    cost: str
    op: str
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    grid_ranks: tuple[int, ...] = (2, 3)
    training_free: bool = False
    check: OptionCheck | None = None
    dense_on: DenseOn | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_FAMILIES: dict[str, Family] = {}


def register_family(record: Family) -> Family:
    """Add a family record; a name or alias used twice is a ValueError."""
    taken = {n for f in _FAMILIES.values() for n in f.names}
    clash = taken.intersection(record.names)
    if clash:
        raise ValueError(f"attention family name(s) {sorted(clash)} registered twice")
    _FAMILIES[record.name] = record
    return record


def families() -> tuple[Family, ...]:
    """Every family record, in registration order (dense softmax first)."""
    return tuple(_FAMILIES.values())


def family(name: str) -> Family:
    """The record of a family by name or alias; ValueError listing the valid names otherwise."""
    for record in _FAMILIES.values():
        if name in record.names:
            return record
    valid = sorted(n for f in _FAMILIES.values() for n in f.names)
    raise ValueError(f"unknown attention family {name!r}; valid names: {', '.join(valid)}")


def check_options(record: Family, options: Mapping[str, Any], op: str | None = None) -> None:
    """Options the family's op does not take are a ValueError listing those it takes; then the values,
    by the family's ``check`` (``op`` names the caller in its messages; the family's op by default)."""
    op = op or record.op
    unknown = set(options) - set(record.options)
    if unknown:
        raise ValueError(f"{op}: unknown options {sorted(unknown)}; valid: {tuple(record.options)}")
    if record.check is not None:
        record.check(options, op)
