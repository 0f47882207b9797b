"""Which attention each block of a backbone uses, with its options: one scheduler for ViT, DiT and
the hierarchical backbones."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence, Union

from ..attention import canonical_name, names, standalone_names
from ..kernels import families
from ..kernels.core.family import check_options

AttnEntry = Union[str, tuple[str, Mapping[str, Any]]]
Placement = Callable[[str, int, int], Mapping[str, Any]]


def _is_entry(value: Any) -> bool:
    """A name, or a (name, options) pair."""
    if isinstance(value, str):
        return True
    return (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], Mapping))


class AttentionSchedule:
    """The attention name and options of every block, stages in order.

    ``attn``: one entry for every block, or one entry per block; an entry is a name or
    ``(name, options)``. ``attn_kwargs``: options per name, e.g. ``{"agent": {"num_agents": 81}}``.
    ``depth``: the number of blocks, or the blocks per stage. ``placement(name, stage, index)``: the
    options that depend on where a block sits (the hierarchical backbones' per-stage choices).
    A block's options merge as ``placement`` < ``attn_kwargs[name]`` < the entry's own options.

    Names and aliases (of the families and of the standalone modules, ``subquad.attention``) are
    resolved once here, so a typo fails at construction with the valid names; the values of a
    family's options in ``attn_kwargs`` are checked here too (``Family.check``), also for a family
    that no block uses (which is warned about: its options have no effect).
    """

    def __init__(self, attn: AttnEntry | Sequence[AttnEntry], attn_kwargs: Mapping[str, Mapping[str, Any]] | None,
                 depth: int | Sequence[int], placement: Placement | None = None) -> None:
        depths = (depth,) if isinstance(depth, int) else tuple(depth)
        total = sum(depths)
        if not _is_entry(attn) and not isinstance(attn, (list, tuple)):
            raise ValueError(f"attn must be a name, a (name, options) pair, or a list of them (one per block), got "
                             f"{attn!r}; valid names: {', '.join(names(aliases=True) + standalone_names())}")
        entries = [attn] * total if _is_entry(attn) else list(attn)
        if len(entries) != total:
            note = f" (depths {depths})" if len(depths) > 1 else ""
            raise ValueError(f"attn lists {len(entries)} entries for {total} blocks{note}, i.e. {len(entries)} names "
                             f"for {total} blocks: {entries}; give one name for every block, or one name or "
                             "(name, options) per block")
        family_options: dict[str, dict[str, Any]] = {}
        for name, options in (attn_kwargs or {}).items():
            if not isinstance(options, Mapping):
                raise ValueError(f"attn_kwargs maps a family name to its options, e.g. "
                                 f"{{'agent': {{'num_agents': 49}}}}; got {name!r}: {options!r}")
            family_options.setdefault(canonical_name(name), {}).update(options)
        for name, options in family_options.items():
            record = next((f for f in families() if f.name == name), None)
            if record is not None:
                check_options(record, {k: v for k, v in options.items() if k in record.options}, f"attn_kwargs[{name!r}]")
        positions = [(stage, index) for stage, blocks in enumerate(depths) for index in range(blocks)]
        self.names: list[str] = []
        self.options: list[dict[str, Any]] = []
        for entry, (stage, index) in zip(entries, positions):
            if not _is_entry(entry):
                raise ValueError(f"an attn entry is a name or (name, options), got {entry!r}")
            name, own = (entry, {}) if isinstance(entry, str) else entry
            name = canonical_name(name)
            placed = placement(name, stage, index) if placement is not None else {}
            self.names.append(name)
            self.options.append({**placed, **family_options.get(name, {}), **own})
        unused = sorted(set(family_options) - set(self.names))
        if unused:
            warnings.warn(f"attn_kwargs gives options for {unused}, which no block uses (the blocks use "
                          f"{sorted(set(self.names))}); they have no effect", stacklevel=2)

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        return self.names[index], self.options[index]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"AttentionSchedule({self.names}, {self.options})"
