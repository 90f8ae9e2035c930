"""Where a job's files live under --data-dir: `jobs/<id>/` (media, kept until the job ends so a
restart can resume) and `tmp/<id>/` (decode scratch, removed after every run)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


class JobFiles:
    def __init__(self, data_dir: str | Path) -> None:
        self.jobs_dir = Path(data_dir) / "jobs"
        self.tmp_dir = Path(data_dir) / "tmp"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def scratch_dir(self, job_id: str) -> Path:
        return self.tmp_dir / job_id

    def remove_scratch(self, job_id: str) -> None:
        shutil.rmtree(self.scratch_dir(job_id), ignore_errors=True)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        self.remove_scratch(job_id)

    def remove_leftovers(self, keep: Callable[[str], bool]) -> None:
        """At start-up: every scratch folder (a crash can leave them; resumed jobs decode again
        anyway) and the media of every job `keep` does not name."""
        for path in self.tmp_dir.iterdir():
            shutil.rmtree(path, ignore_errors=True)
        for path in self.jobs_dir.iterdir():
            if not keep(path.name):
                shutil.rmtree(path, ignore_errors=True)
