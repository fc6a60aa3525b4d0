"""ResultStore: one SQLite row per study cell, safe against crashes and reruns.

The database runs in WAL mode; every write is one transaction, so a process killed with
SIGKILL leaves each row either fully written or absent. Rows are keyed by ``run_id`` (a hash of
the cell's full configuration), so a rerun replaces a row rather than duplicating it.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackdoorLabError

AXES = ("dataset", "model", "attack", "compression", "defense")
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    attack TEXT NOT NULL,
    compression TEXT NOT NULL,
    defense TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    error TEXT,
    wall_time REAL,
    versions TEXT NOT NULL DEFAULT '{}',
    artifacts TEXT NOT NULL DEFAULT '{}',
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS results_study ON results(study);
"""


def versions() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    return {"backdoorlab": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


@dataclass
class Row:
    """One cell's record."""

    run_id: str
    study: str
    dataset: str
    model: str
    attack: str
    compression: str
    defense: str
    seed: int
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    wall_time: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None


_JSON_COLS = ("config", "metrics", "versions", "artifacts")


class ResultStore:
    """SQLite result store at ``path`` (created on first write, never on read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.exists():
            raise BackdoorLabError(f"no result store at {self.path}; run a study first")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=60)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            if create:
                con.executescript(SCHEMA)
            return con
        except sqlite3.DatabaseError as exc:
            raise BackdoorLabError(f"result store {self.path} is not a usable SQLite file: {exc}") from None

    def put(self, row: Row) -> None:
        """Insert or replace ``row`` in one transaction."""
        values = {k: getattr(row, k) for k in Row.__dataclass_fields__}
        for k in _JSON_COLS:
            values[k] = json.dumps(values[k], sort_keys=True, default=str)
        cols = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        con = self._connect(create=True)
        try:
            with con:
                con.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})", values)
        finally:
            con.close()

    def status(self, run_ids: Iterable[str]) -> dict[str, str]:
        """``{run_id: status}`` for the ids present in the store."""
        if not self.path.exists():
            return {}
        ids = list(run_ids)
        con = self._connect(create=False)
        try:
            out: dict[str, str] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = f"SELECT run_id, status FROM results WHERE run_id IN ({','.join('?' * len(chunk))})"
                out.update(dict(con.execute(q, chunk).fetchall()))
            return out
        except sqlite3.OperationalError:  # a store without the table yet
            return {}
        finally:
            con.close()

    def rows(self, study: str | None = None) -> list[Row]:
        con = self._connect(create=False)
        try:
            con.row_factory = sqlite3.Row
            q = "SELECT * FROM results"
            args: tuple = ()
            if study is not None:
                q += " WHERE study = ?"
                args = (study,)
            q += " ORDER BY study, dataset, model, attack, compression, defense, seed"
            try:
                fetched = con.execute(q, args).fetchall()
            except sqlite3.OperationalError:
                return []
        finally:
            con.close()
        out = []
        for r in fetched:
            d = dict(r)
            for k in _JSON_COLS:
                d[k] = json.loads(d[k]) if d[k] else {}
            out.append(Row(**d))
        return out

    def frame(self, study: str | None = None):
        """A pandas DataFrame, one row per cell, with metrics expanded into columns."""
        import pandas as pd

        records = []
        for r in self.rows(study):
            rec = {k: getattr(r, k) for k in ("run_id", "study", *AXES, "seed", "status", "error",
                                               "wall_time", "started_at", "finished_at")}
            for k, v in r.metrics.items():
                rec[k] = v
            rec["config"] = json.dumps(r.config, sort_keys=True)
            rec["versions"] = json.dumps(r.versions, sort_keys=True)
            records.append(rec)
        return pd.DataFrame.from_records(records)

    def export(self, out: str | os.PathLike, formats: Iterable[str] = ("csv", "parquet"),
               study: str | None = None) -> list[Path]:
        """Write ``out.csv`` / ``out.parquet`` atomically; returns the paths written."""
        from ..utils import atomic_path

        df = self.frame(study)
        base = Path(out)
        if base.suffix in (".csv", ".parquet"):
            base = base.with_suffix("")
        written = []
        for fmt in formats:
            if fmt not in ("csv", "parquet"):
                raise BackdoorLabError(f"unknown export format {fmt!r}; use csv or parquet")
            path = base.with_name(base.name + "." + fmt)
            with atomic_path(path) as tmp:
                if fmt == "csv":
                    df.to_csv(tmp, index=False)
                else:
                    df.to_parquet(tmp, index=False)
            written.append(path)
        return written


def now() -> float:
    return time.time()
