"""Jobs' metadata in SQLite: the embedded default behind `store.JobStore`. One table, one row a
job; every call is its own transaction (WAL), so a process killed at any point leaves the rows
as they were at its last finished call."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

from .store import JobRecord

_FIELDS = [f.name for f in dataclasses.fields(JobRecord)]


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        columns = ", ".join(
            f"{name} {'TEXT PRIMARY KEY' if name == 'id' else ''}" for name in _FIELDS
        )
        self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns})")

    def put(self, job: JobRecord) -> None:
        values = dataclasses.astuple(job)
        marks = ", ".join("?" for _ in _FIELDS)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs VALUES ({marks})", values)

    def _rows(self, where: str, args: tuple[object, ...], order: str) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FIELDS)} FROM jobs {where} ORDER BY created {order}", args
            ).fetchall()
        return [JobRecord(*row) for row in rows]

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._rows("WHERE id = ?", (job_id,), "ASC")
        return rows[0] if rows else None

    def owned_by(self, owner: str) -> list[JobRecord]:
        return self._rows("WHERE owner = ?", (owner,), "DESC")

    def all(self) -> list[JobRecord]:
        return self._rows("", (), "ASC")

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
