"""Finished jobs, their events, stored windows and files expire after --retention-hours."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from longscribe.client.client import LongscribeClient, LongscribeError

from tests.conftest import JFK, ServerProcess


def test_finished_jobs_expire(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--retention-hours", "0.0005").start()  # 1.8 s
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            job = client.upload(str(JFK))
            client.wait(job.job_id)
            assert client.get(job.job_id).job_id == job.job_id
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    client.get(job.job_id)
                except LongscribeError as err:
                    assert err.code == grpc.StatusCode.NOT_FOUND
                    break
                time.sleep(0.5)
            else:
                pytest.fail("the finished job did not expire")
    finally:
        assert server.stop() == 0
    db = sqlite3.connect(server.data_dir / "jobs.sqlite3")
    for table in ("jobs", "events", "windows"):
        count = db.execute(f"SELECT COUNT(*) FROM {table} WHERE job_id = ?",
                           (job.job_id,)).fetchone()[0]
        assert count == 0, f"{table} still holds the expired job"
    assert not (server.data_dir / "jobs" / job.job_id).exists()
