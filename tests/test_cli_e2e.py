"""The `longscribe` CLI and `make demo` against real servers, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import JFK, ROOT, ServerProcess, jfk_text, wer

CLI = [sys.executable, "-m", "longscribe.client"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LONGSCRIBE_PROGRESS": "log"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_cli_transcribe_upload_to_srt_file(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "jfk.srt"
    done = run_cli("transcribe", str(JFK), "--server", server.target, "--format", "srt",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    srt = out.read_text()
    assert srt.startswith("1\n00:00:0") and "-->" in srt
    spoken = " ".join(line for line in srt.splitlines()
                      if line and "-->" not in line and not line.isdigit())
    assert wer(jfk_text(), spoken) <= 0.05
    assert "transcribing" in done.stderr  # progress went to stderr, not into the transcript


def test_cli_jobs_list_get_json(server: ServerProcess) -> None:
    done = run_cli("transcribe", "jfk.flac", "--server-path", "--server", server.target,
                   "--format", "json")
    assert done.returncode == 0, done.stderr
    assert wer(jfk_text(), json.loads(done.stdout)["text"]) <= 0.05
    listed = run_cli("jobs", "list", "--json", "--server", server.target)
    assert listed.returncode == 0, listed.stderr
    jobs = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert jobs
    job_id = jobs[0].get("jobId") or jobs[0]["job_id"]
    got = run_cli("jobs", "get", job_id, "--json", "--server", server.target)
    assert got.returncode == 0, got.stderr
    assert job_id in got.stdout


def test_cli_failed_job_exits_1_with_the_status(server: ServerProcess, tmp_path: Path) -> None:
    fake = tmp_path / "fake.wav"
    fake.write_text("not audio\n" * 100)
    done = run_cli("transcribe", str(fake), "--server", server.target)
    assert done.returncode == 1
    assert "error: INVALID_ARGUMENT" in done.stderr


def test_cli_unknown_job_and_bad_source(server: ServerProcess) -> None:
    missing = run_cli("jobs", "get", "nope", "--server", server.target)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    usage = run_cli("transcribe", "no/such/file.mp3", "--server", server.target)
    assert usage.returncode == 2


def test_make_demo_prints_a_transcript() -> None:
    """What `make demo` runs (the venv already exists here)."""
    done = subprocess.run([sys.executable, "-m", "longscribe.service.demo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    transcript = done.stdout.split("--- transcript", 1)[1].split("---", 1)[1]
    assert wer(jfk_text(), transcript) <= 0.05, done.stdout
