"""Result rows (dicts with the same keys) as a fixed-width text table or a CSV file: every table the
CLI prints (``subquad models``, ``families``, ``bench``) and every CSV the benchmarks write."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence, TextIO

Column = tuple[str, str, "str | None"]      # (key, header, format spec; None: floats as .4g, the rest as str)


def columns_of(rows: Sequence[dict[str, Any]]) -> list[Column]:
    """One column per key of the first row, headed by the key."""
    return [(key, key, None) for key in rows[0]] if rows else []


def _cell(value: Any, spec: str | None) -> str:
    if value is None:
        return "-"
    if spec is None:
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return format(value, spec)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None) -> str:
    """A fixed-width text table; ``columns`` = [(key, header, format spec)] (default: ``columns_of(rows)``).
    Text columns are left-aligned, numbers right-aligned."""
    columns = list(columns) if columns is not None else columns_of(rows)
    cells = [[_cell(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    left = [f == "s" or (f is None and bool(rows) and isinstance(rows[0][k], str)) for k, _, f in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if lj else v.rjust(w) for v, w, lj in zip(values, widths, left)).rstrip()
    return "\n".join([line([h for _, h, _ in columns]), line(["-" * w for w in widths])] + [line(c) for c in cells])


def save_csv(rows: Sequence[dict[str, Any]], out: Path | str | TextIO) -> None:
    """Write ``rows`` as CSV with a header (every key, in order of first appearance; a row without a key
    leaves its cell empty) to a path or an open text file."""
    if isinstance(out, (str, Path)):
        with open(out, "w", newline="") as f:
            save_csv(rows, f)
        return
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
