"""Durable job state in embedded SQLite (WAL): jobs, their event logs, and per-window results.

Everything a restarted server needs to resume a job lives here: the job row (source, options,
where its media lies, state), every event it emitted (so WatchJob replays across restarts), and
the result of every finished window (so resumed jobs skip them)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from longscribe.v1 import transcription_pb2 as pb

TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    request_id TEXT,
    client TEXT NOT NULL DEFAULT '',
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    media_path TEXT NOT NULL DEFAULT '',
    options BLOB NOT NULL,
    state INTEGER NOT NULL,
    error_code INTEGER NOT NULL DEFAULT 0,
    error_message TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    duration REAL NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    chunks_done INTEGER NOT NULL DEFAULT 0,
    chunks_reused INTEGER NOT NULL DEFAULT 0,
    progress BLOB,
    result BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(client, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    segments BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""


@dataclass
class JobRow:
    job_id: str
    seq: int
    request_id: str | None
    client: str
    source_kind: str  # "url" | "path" | "upload"
    source: str
    media_path: str
    options: pb.TranscriptionOptions
    state: int
    error_code: int = 0
    error_message: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    finished: float | None = None
    duration: float = 0.0
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_reused: int = 0
    progress: pb.Progress | None = None
    result: pb.Result | None = None
    event_count: int = 0


@dataclass(frozen=True)
class StoredWindow:
    index: int
    start: float
    end: float
    segments: list[pb.Segment]


class JobStore:
    """Thread-safe: one connection guarded by a lock (SQLite serialises writers anyway)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (only an OS crash can lose the last commits).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- jobs -------------------------------------------------------------------------------

    def insert_job(self, row: JobRow) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, seq, request_id, client, source_kind, source,"
                " media_path, options, state, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.job_id, row.seq, row.request_id, row.client, row.source_kind, row.source,
                    row.media_path, row.options.SerializeToString(), row.state, row.created,
                    row.updated,
                ),
            )

    def update_job(self, job_id: str, **fields: object) -> None:
        """Update columns; protobuf values are serialised."""
        if not fields:
            return
        values = [v.SerializeToString() if hasattr(v, "SerializeToString") else v
                  for v in fields.values()]
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*values, job_id))

    def next_seq(self) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
        return int(value)

    def load_jobs(self, states: Sequence[int] | None = None) -> list[JobRow]:
        query = "SELECT * FROM jobs"
        params: tuple[object, ...] = ()
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(states)
        with self._lock:
            cursor = self._db.execute(query + " ORDER BY seq", params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
            counts = dict(self._db.execute(
                "SELECT job_id, COALESCE(MAX(idx), -1) + 1 FROM events GROUP BY job_id"
            ).fetchall())
        return [self._to_row(r, counts.get(r["job_id"], 0)) for r in rows]

    def load_job(self, job_id: str) -> JobRow | None:
        """One job's row (with its result), or None."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
            names = [d[0] for d in cursor.description]
            found = cursor.fetchone()
            if found is None:
                return None
            count = self._db.execute(
                "SELECT COALESCE(MAX(idx), -1) + 1 FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
        return self._to_row(dict(zip(names, found, strict=True)), count)

    @staticmethod
    def _to_row(r: dict[str, object], event_count: int) -> JobRow:
        options = pb.TranscriptionOptions.FromString(r.pop("options"))  # type: ignore[arg-type]
        progress_blob = r.pop("progress")
        result_blob = r.pop("result")
        return JobRow(
            **r,  # type: ignore[arg-type]
            options=options,
            progress=pb.Progress.FromString(progress_blob) if progress_blob else None,
            result=pb.Result.FromString(result_blob) if result_blob else None,
            event_count=event_count,
        )

    def delete_job(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            for table in ("events", "windows", "jobs"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            self._db.execute("COMMIT")

    # --- events -----------------------------------------------------------------------------

    def append_event(self, event: pb.JobEvent) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO events (job_id, idx, data) VALUES (?,?,?)",
                (event.job_id, event.index, event.SerializeToString()),
            )

    def read_events(self, job_id: str, start: int, stop: int) -> Iterator[pb.JobEvent]:
        """Events with start <= index < stop, read in pages so a long log never sits in memory."""
        page = 256
        while start < stop:
            with self._lock:
                rows = self._db.execute(
                    "SELECT idx, data FROM events WHERE job_id = ? AND idx >= ? AND idx < ?"
                    " ORDER BY idx LIMIT ?",
                    (job_id, start, stop, page),
                ).fetchall()
            if not rows:
                return
            for idx, data in rows:
                yield pb.JobEvent.FromString(data)
                start = idx + 1

    # --- windows ----------------------------------------------------------------------------

    def save_window(self, job_id: str, window: StoredWindow) -> None:
        self.commit_window(job_id, window, ())

    def commit_window(self, job_id: str, window: StoredWindow,
                      events: Sequence[pb.JobEvent]) -> None:
        """A window's result and its events, atomically."""
        blob = pb.Result(segments=window.segments).SerializeToString()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO windows (job_id, idx, start, end, segments)"
                    " VALUES (?,?,?,?,?)",
                    (job_id, window.index, window.start, window.end, blob),
                )
                self._db.executemany(
                    "INSERT INTO events (job_id, idx, data) VALUES (?,?,?)",
                    [(e.job_id, e.index, e.SerializeToString()) for e in events],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def load_windows(self, job_id: str) -> dict[int, StoredWindow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, start, end, segments FROM windows WHERE job_id = ?", (job_id,)
            ).fetchall()
        return {
            idx: StoredWindow(idx, start, end, list(pb.Result.FromString(blob).segments))
            for idx, start, end, blob in rows
        }

    def delete_windows(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM windows WHERE job_id = ?", (job_id,))
