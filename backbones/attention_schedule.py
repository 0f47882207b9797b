"""Which attention family each block of a backbone uses, with each family's options."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..attention import canonical_name


class AttentionSchedule:
    """``attn``: one family name for every block, or a list with one name per block;
    ``attn_kwargs``: options per family name, e.g. ``{"agent": {"num_agents": 81}}``.

    Names and aliases are resolved once here, so a typo fails at construction with the valid names.
    """

    def __init__(self, attn: str | Sequence[str], attn_kwargs: Mapping[str, Mapping[str, Any]] | None,
                 depth: int) -> None:
        names = [attn] * depth if isinstance(attn, str) else list(attn)
        if len(names) != depth:
            raise ValueError(f"attn lists {len(names)} names for {depth} blocks: {names}")
        self.names = [canonical_name(n) for n in names]
        self.kwargs: dict[str, dict[str, Any]] = {}
        for name, kw in (attn_kwargs or {}).items():
            if not isinstance(kw, Mapping):
                raise ValueError(f"attn_kwargs maps a family name to its options, e.g. "
                                 f"{{'agent': {{'num_agents': 49}}}}; got {name!r}: {kw!r}")
            self.kwargs.setdefault(canonical_name(name), {}).update(kw)

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        name = self.names[index]
        return name, self.kwargs.get(name, {})

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"AttentionSchedule({self.names}, {self.kwargs})"
