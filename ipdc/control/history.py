"""Job history: every job this node submitted, in SQLite at ``$IPDC_HOME/ipdc.db``.

Why SQLite: it ships with Python (nothing to install on a small board), one file
holds the whole history, and in WAL mode the controller service writes while any
number of ``ipdc jobs`` readers look, without a server. The service is the only
writer; the CLI reads the file directly, so ``ipdc jobs`` and ``ipdc job status``
work (and are fast) even when the service is down.

What it keeps, per job: kind, submitter key, submitting node, parameters, state,
timestamps, progress, workers, result CID and output dir; the plan a restarted
service needs to resume it (manifest, chunk sizes); and per task its state,
accepted output, failures, story and every attempt (peer, start, end, state,
error). Attempt times are seconds since the job started, as in its story.

Schema changes are versioned: ``PRAGMA user_version`` holds how many of
:data:`MIGRATIONS` have run, and opening a file runs the missing ones in order, in
one transaction each. A file made by a newer IPDC is refused rather than guessed at.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ipdc.errors import HistoryError
from ipdc.private import private_dir

DB_NAME = "ipdc.db"
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
#: Columns of ``jobs`` that hold JSON, decoded on the way out.
JSON_COLUMNS = ("params", "workers", "progress", "plan", "summary", "lost", "reassigned")


def _v1(db: sqlite3.Connection) -> None:
    db.executescript("""
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            submitter TEXT NOT NULL,
            node TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            submitted_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            error TEXT NOT NULL DEFAULT '',
            result_cid TEXT NOT NULL DEFAULT '',
            output_dir TEXT NOT NULL DEFAULT '',
            workers TEXT NOT NULL DEFAULT '[]',
            progress TEXT NOT NULL DEFAULT '{}',
            plan TEXT NOT NULL DEFAULT 'null',
            summary TEXT NOT NULL DEFAULT 'null'
        );
        CREATE TABLE tasks (
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('map', 'reduce')),
            idx INTEGER NOT NULL,
            state TEXT NOT NULL,
            output TEXT NOT NULL DEFAULT '[]',
            by_peers TEXT NOT NULL DEFAULT '[]',
            failures INTEGER NOT NULL DEFAULT 0,
            tried TEXT NOT NULL DEFAULT '[]',
            story TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (job_id, kind, idx)
        );
        CREATE TABLE attempts (
            job_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            idx INTEGER NOT NULL,
            number INTEGER NOT NULL,
            peer TEXT NOT NULL,
            state TEXT NOT NULL,
            started REAL NOT NULL,
            ended REAL,
            error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (job_id, kind, idx, number),
            FOREIGN KEY (job_id, kind, idx) REFERENCES tasks(job_id, kind, idx) ON DELETE CASCADE
        );
    """)


def _v2(db: sqlite3.Connection) -> None:
    """Workers lost and tasks reassigned, per job (the dashboard's timeline shows them);
    and an index for ``ipdc jobs --state S``, newest first."""
    db.executescript("""
        ALTER TABLE jobs ADD COLUMN lost TEXT NOT NULL DEFAULT '{}';
        ALTER TABLE jobs ADD COLUMN reassigned TEXT NOT NULL DEFAULT '[]';
        CREATE INDEX jobs_by_state ON jobs (state, submitted_at);
    """)


#: Schema version N is what the first N functions make. Append; never edit one that shipped.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]


def migrate(db: sqlite3.Connection, path: Path | str, target: int | None = None) -> int:
    """Bring the schema to version ``target`` (default: the newest); returns the version."""
    target = len(MIGRATIONS) if target is None else target
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise HistoryError(f"{path} has schema version {version}, newer than this IPDC knows "
                           f"({len(MIGRATIONS)}): upgrade IPDC, or move the file away to start a new history")
    while version < target:
        with db:  # one transaction per step: a failed step leaves the previous version intact
            db.execute("BEGIN")
            MIGRATIONS[version](db)
            version += 1
            db.execute(f"PRAGMA user_version = {version}")
    return version


class History:
    """The job history of one node. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            # ``ipdc jobs`` before ``init`` makes the home: 0700 as init makes it, not the umask's
            private_dir(path.parent)
            self._db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode = WAL")
            # A commit reaches the WAL file (the OS's page cache) without an fsync: it survives a
            # kill -9 of the service, and only an OS crash can lose the last few, which a resumed
            # job runs again. An fsync per accepted task cost a tiny job about 30 ms (py-spy).
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            migrate(self._db, path)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open the job history {path}: {exc}") from None
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def _write(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    for sql, args in statements:
                        self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot write the job history {self.path}: {exc}") from None

    # -- writing (the controller service) -------------------------------------------------
    def add(self, job_id: str, kind: str, submitter: str, node: str, params: dict[str, Any],
            output_dir: str, submitted_at: float | None = None) -> None:
        self._write([("INSERT INTO jobs (id, kind, submitter, node, params, state, submitted_at, output_dir) "
                      "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                      (job_id, kind, submitter, node, json.dumps(params), submitted_at or time.time(),
                       output_dir))])

    def update(self, job_id: str, **fields: Any) -> None:
        """Set columns of one job; JSON columns take Python values."""
        unknown = set(fields) - set(self._columns())
        if unknown:
            raise HistoryError(f"unknown job field(s): {', '.join(sorted(unknown))}")
        if "state" in fields and fields["state"] not in STATES:
            raise HistoryError(f"unknown job state {fields['state']!r}")
        values = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self._write([(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))])

    def save_tasks(self, job_id: str, tasks: list[dict[str, Any]]) -> None:
        """Replace the job's tasks and attempts with ``tasks`` (see :func:`task_record`
        in ipdc.submit.mapreduce for the shape), in one transaction."""
        statements: list[tuple[str, tuple[Any, ...]]] = [("DELETE FROM tasks WHERE job_id = ?", (job_id,))]
        for t in tasks:
            statements.append((
                "INSERT INTO tasks (job_id, kind, idx, state, output, by_peers, failures, tried, story) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, t["kind"], t["index"], t["state"], json.dumps(t["output"]), json.dumps(t["by"]),
                 t["failures"], json.dumps(t["tried"]), json.dumps(t["story"]))))
            statements.extend((
                "INSERT INTO attempts (job_id, kind, idx, number, peer, state, started, ended, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, t["kind"], t["index"], a["number"], a["peer"], a["state"], a["started"], a["ended"],
                 a["error"])) for a in t["attempts"])
        self._write(statements)

    # -- reading (the service and the CLI) ------------------------------------------------------
    def _columns(self) -> list[str]:
        return [row[1] for row in self._db.execute("PRAGMA table_info(jobs)")]

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot read the job history {self.path}: {exc}") from None

    def jobs(self, states: Iterable[str] = (), limit: int = 0) -> list[dict[str, Any]]:
        """Jobs, newest first, without their tasks; only those in ``states`` if given."""
        wanted = tuple(states)
        where = f"WHERE state IN ({', '.join('?' * len(wanted))})" if wanted else ""
        rows = self._read(f"SELECT * FROM jobs {where} ORDER BY submitted_at DESC"
                          + (f" LIMIT {int(limit)}" if limit else ""), wanted)
        return [_job(row) for row in rows]

    def job(self, job_id: str) -> dict[str, Any] | None:
        """One job with its tasks (``tasks``: kind -> list, each with its ``attempts``)."""
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = _job(rows[0])
        attempts: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for a in self._read("SELECT * FROM attempts WHERE job_id = ? ORDER BY kind, idx, number", (job_id,)):
            attempts.setdefault((a["kind"], a["idx"]), []).append(
                {"number": a["number"], "peer": a["peer"], "state": a["state"], "started": a["started"],
                 "ended": a["ended"], "error": a["error"]})
        job["tasks"] = {"map": [], "reduce": []}
        for t in self._read("SELECT * FROM tasks WHERE job_id = ? ORDER BY kind, idx", (job_id,)):
            job["tasks"][t["kind"]].append({
                "kind": t["kind"], "index": t["idx"], "state": t["state"], "output": json.loads(t["output"]),
                "by": json.loads(t["by_peers"]), "failures": t["failures"], "tried": json.loads(t["tried"]),
                "story": json.loads(t["story"]), "attempts": attempts.get((t["kind"], t["idx"]), [])})
        return job

    def resolve(self, prefix: str) -> str:
        """The one job id starting with ``prefix`` (ids are long: a few digits do)."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise HistoryError(f"{prefix!r} is not a job id: job ids are hex digits (see `ipdc jobs --all`)")
        rows = self._read("SELECT id FROM jobs WHERE id LIKE ? ORDER BY submitted_at DESC LIMIT 2",
                          (prefix + "%",))
        if not rows:
            raise HistoryError(f"no job {prefix} was submitted from this node (`ipdc jobs --all` lists them)")
        if len(rows) > 1:
            raise HistoryError(f"{prefix} names more than one job: give more digits")
        return str(rows[0]["id"])


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    for key in JSON_COLUMNS:
        job[key] = json.loads(job[key])
    return job
