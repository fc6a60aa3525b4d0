"""ResultStore: one SQLite row per study cell, safe against crashes, reruns and concurrent runs.

The database runs in WAL mode; every write is one transaction, so a process killed with
SIGKILL leaves each row either fully written or absent. Rows are keyed by ``run_id`` (a hash of
the cell's full configuration), so a rerun replaces a row rather than duplicating it; a finished
(``ok``) row is never replaced by an unfinished or failed one.

Several processes (on one host or several hosts sharing the file) may run one study on one store
at once: each *claims* a cell before running it (:meth:`ResultStore.claim`), which takes a lease
row (owner, pid, host, heartbeat) in the ``leases`` table. A lease is honoured while its holder is
alive: on the same host, its pid exists and its heartbeat is fresher than :data:`LEASE_STALE_S`;
on another host, its heartbeat is fresh. Otherwise the next claimant takes it over. The holder
refreshes its heartbeat (:meth:`ResultStore.heartbeat`) and writes its result and drops its lease
in one transaction (:meth:`ResultStore.finish`).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from ..errors import BackdoorLabError

_T = TypeVar("_T")

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
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
"""

# A row no process should run again: ``ok``, or finished (``error``) at or after the bound
# parameter ``since`` (another process ran it while this one was running the study); NULL = no bound.
_SETTLED = "(status = 'ok' OR (status != 'running' AND finished_at >= ?))"

#: A lease whose heartbeat is older than this many seconds is taken over, whoever holds it (its
#: holder refreshes it every ``pipeline.HEARTBEAT_S`` seconds while alive). A module constant so a
#: test can make it small.
LEASE_STALE_S = 120.0


def new_owner() -> str:
    """An id for one process's leases: ``host:pid:uuid`` (the uuid tells apart a pid reused later)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:  # e.g. an invalid pid
        return False
    return True


def _holder_alive(pid: int, host: str, heartbeat: float, at: float) -> bool:
    """Whether a lease's holder counts as alive at time ``at`` (see the module docstring)."""
    if at - heartbeat > LEASE_STALE_S:
        return False
    return host != socket.gethostname() or _pid_alive(pid)


def versions() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    out = {"backdoorlab": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(terse=True),
           # the kernels that trained and ran the cell: another instruction set trains another
           # model from the same seed (README, "One training path on every x86 machine")
           "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if onednn:
        out["onednn_max_cpu_isa"] = onednn
    return out


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
        if self.path.is_dir():
            raise BackdoorLabError(f"result store {self.path} is a directory; give the path of a file")
        if create:
            self.check_writable()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Another process may be creating the store or switching it to WAL at this moment: that
        # change answers "database is locked" at once, without SQLite's busy timeout, so the
        # set-up is retried for as long as the timeout would have waited.
        deadline = time.monotonic() + 60
        delay = 0.01
        while True:
            con = None
            try:
                con = sqlite3.connect(self.path, timeout=60)
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                if create:
                    con.executescript(SCHEMA)
                return con
            except sqlite3.OperationalError as exc:
                if con is not None:
                    con.close()
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    self._open_error(exc)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except sqlite3.DatabaseError as exc:
                if con is not None:
                    con.close()
                self._open_error(exc)

    def _open_error(self, exc: sqlite3.DatabaseError) -> NoReturn:
        """The one line for a store that cannot be opened (not a database, not writable)."""
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise BackdoorLabError(f"result store {self.path} is not a SQLite database ({exc})") from None
        raise BackdoorLabError(f"cannot open result store {self.path}: {exc}; check that the file "
                               f"and its directory {self.path.parent} are writable") from None

    def check_writable(self) -> None:
        """One line naming the path if the store cannot be created or written here (a missing
        parent that cannot be made, a directory without write permission, a read-only file)."""
        if self.path.is_dir():
            raise BackdoorLabError(f"result store {self.path} is a directory; give the path of a file")
        if self.path.exists():
            ok = os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)  # WAL files beside it
            if not ok:
                raise BackdoorLabError(f"result store {self.path} is not writable (it or its directory "
                                       f"{self.path.parent} is read-only)")
            return
        parent = self.path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise BackdoorLabError(f"cannot create result store {self.path}: {parent} is not a directory")
        try:  # a real probe: permission bits do not tell root's or a read-only mount's story
            import tempfile

            fd, probe = tempfile.mkstemp(prefix=".backdoorlab-probe.", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise BackdoorLabError(f"cannot create result store {self.path}: directory {parent} is not writable "
                                   f"({exc.strerror or exc})") from None

    @staticmethod
    def _upsert(con: sqlite3.Connection, row: Row, where: str) -> bool:
        """Insert ``row``, or replace the stored row with it where ``where`` holds (SQL over
        ``results``, the stored row, and ``excluded``, the new one); whether it was written."""
        values = {k: getattr(row, k) for k in Row.__dataclass_fields__}
        for k in _JSON_COLS:
            values[k] = json.dumps(values[k], sort_keys=True, default=str)
        cols = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        sets = ", ".join(f"{k} = excluded.{k}" for k in values if k != "run_id")
        cur = con.execute(f"INSERT INTO results ({cols}) VALUES ({marks}) "
                          f"ON CONFLICT(run_id) DO UPDATE SET {sets} WHERE {where}", values)
        return cur.rowcount > 0

    def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(con)`` inside one ``BEGIN IMMEDIATE`` transaction (the write lock is taken first,
        so a read-then-write is atomic against other processes), committed if it returns."""
        con = self._connect(create=True)
        try:
            con.isolation_level = None  # explicit transactions only
            con.execute("BEGIN IMMEDIATE")
            try:
                out = fn(con)
                con.execute("COMMIT")
                return out
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    def put(self, row: Row) -> None:
        """Insert or replace ``row`` in one transaction; an ``ok`` row is never replaced by a row
        that is not ``ok`` (that write is dropped)."""
        self._write(
            lambda con: self._upsert(con, row, "results.status != 'ok' OR excluded.status = 'ok'"))

    # -------------------------------------------------------------- leases (concurrent runs)
    def claim(self, run_id: str, owner: str, since: float | None = None) -> bool:
        """Take the lease on cell ``run_id`` for ``owner`` (from :func:`new_owner`), in one
        ``BEGIN IMMEDIATE`` transaction. Refused (``False``) if the cell's row is ``ok``, if it is
        an error that finished at or after ``since`` (another process ran it during this run), or
        if another owner's lease on it is alive (see the module docstring); a dead or stale lease
        is taken over. Returns ``True`` when ``owner`` holds the lease."""
        host, pid, at = socket.gethostname(), os.getpid(), now()

        def go(con: sqlite3.Connection) -> bool:
            if con.execute(f"SELECT 1 FROM results WHERE run_id = ? AND {_SETTLED}",
                           (run_id, since)).fetchone() is not None:
                return False
            lease = con.execute("SELECT owner, pid, host, heartbeat FROM leases WHERE run_id = ?",
                                (run_id,)).fetchone()
            if lease is not None and lease[0] != owner and _holder_alive(lease[1], lease[2], lease[3], at):
                return False
            con.execute("INSERT OR REPLACE INTO leases (run_id, owner, pid, host, heartbeat) "
                        "VALUES (?, ?, ?, ?, ?)", (run_id, owner, pid, host, at))
            return True

        return self._write(go)

    def settled(self, run_ids: Iterable[str], since: float | None = None) -> set[str]:
        """The ids among ``run_ids`` that :meth:`claim` refuses whatever the leases: ``ok``, or
        finished (not ``running``) at or after ``since``."""
        if not self.path.exists():
            return set()
        ids = list(run_ids)
        con = self._connect(create=False)
        try:
            out: set[str] = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = f"SELECT run_id FROM results WHERE run_id IN ({','.join('?' * len(chunk))}) AND {_SETTLED}"
                out.update(r[0] for r in con.execute(q, [*chunk, since]).fetchall())
            return out
        except sqlite3.OperationalError:  # a store without the table yet
            return set()
        finally:
            con.close()

    def heartbeat(self, owner: str) -> int:
        """Refresh the heartbeat of every lease ``owner`` holds; returns how many it holds."""
        return self._write(lambda con: con.execute(
            "UPDATE leases SET heartbeat = ? WHERE owner = ?", (now(), owner)).rowcount)

    def release(self, run_id: str, owner: str) -> None:
        """Drop ``owner``'s lease on ``run_id`` (nothing if another owner holds it now)."""
        self._write(lambda con: con.execute(
            "DELETE FROM leases WHERE run_id = ? AND owner = ?", (run_id, owner)))

    def finish(self, row: Row, owner: str) -> bool:
        """Write the finished ``row`` and drop ``owner``'s lease on it, in one transaction. A stored
        ``ok`` row is never rewritten (returns ``False``: another process finished the cell first,
        after taking over a lease it judged dead); otherwise returns ``True``."""
        def go(con: sqlite3.Connection) -> bool:
            written = self._upsert(con, row, "results.status != 'ok'")
            con.execute("DELETE FROM leases WHERE run_id = ? AND owner = ?", (row.run_id, owner))
            return written

        return self._write(go)

    def leases(self) -> dict[str, dict[str, Any]]:
        """``{run_id: {owner, pid, host, heartbeat, alive}}`` for the leases in the store."""
        if not self.path.exists():
            return {}
        con = self._connect(create=False)
        try:
            fetched = con.execute("SELECT run_id, owner, pid, host, heartbeat FROM leases").fetchall()
        except sqlite3.OperationalError:  # a store from before leases
            return {}
        finally:
            con.close()
        at = now()
        return {r[0]: {"owner": r[1], "pid": r[2], "host": r[3], "heartbeat": r[4],
                       "alive": _holder_alive(r[2], r[3], r[4], at)} for r in fetched}

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
