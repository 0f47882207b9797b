"""Metrics of a run, rewritten atomically at every interval as CSV (one file per kind) and JSON.

The CSV files hold the scalar metrics; nested ones (per-class scores) are in the JSON only.

``<run>/train_metrics.csv``, ``<run>/eval_metrics.csv`` and ``<run>/metrics.json``
(``{"train": [rows], "eval": [rows]}``), and ``<run>/curves.png`` (``plot``). A resumed run first drops the
rows the killed run logged after its last checkpoint, so the files read as one uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .checkpoint import read_json, writing
from .curves import CURVES, plot_curves


class MetricsLog:
    KINDS = ("train", "eval")

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / "metrics.json"
        self.rows: dict[str, list[dict]] = read_json(path, "metrics log", self.KINDS) if path.is_file() else \
            {k: [] for k in self.KINDS}

    def truncate(self, step: int) -> None:
        """Forget rows logged after ``step`` (by a run that was killed before its next checkpoint)."""
        self.rows = {k: [r for r in rows if r["step"] <= step] for k, rows in self.rows.items()}
        self._write()

    def log(self, kind: str, row: dict) -> None:
        """Append a row (it must hold ``step``) and rewrite the files."""
        self.rows[kind].append(row)
        self._write()

    def plot(self) -> Path | None:
        """Draw the curves so far into ``curves.png`` beside the CSVs (None before the first row)."""
        return plot_curves(self.rows, self.folder / CURVES)

    def _write(self) -> None:
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        _replace(self.folder / "metrics.json", lambda f: json.dump(self.rows, f, indent=1))
        for kind, rows in self.rows.items():
            if rows:
                columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, dict)))
                _replace(self.folder / f"{kind}_metrics.csv",
                         lambda f: _write_csv(f, columns, rows))


def _write_csv(f, columns: list[str], rows: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
