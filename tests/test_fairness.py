"""Fairness across jobs through a real server: a short job submitted while a 30-minute job
transcribes finishes within 3x its time alone (it waited for the long job's whole running
batch, then shared the next one with it: 12 s against 0.7 s alone)."""

from __future__ import annotations

from pathlib import Path

from bench.run import LJ, measure_fairness, tile
from tests.conftest import JFK, ServerProcess, jfk_text, require_testdata, wer


def test_short_job_during_a_long_job(tmp_path: Path) -> None:
    require_testdata()
    long_audio = tmp_path / "lj-30min.flac"
    tile(LJ, 30, long_audio)
    server = ServerProcess(tmp_path / "data").start(timeout=300)
    try:
        report = measure_fairness(server.target, long_audio, JFK)
    finally:
        server.stop()
    assert report["long_job_still_running"], report  # every short run overlapped it
    assert all(wer(jfk_text(), text) <= 0.05 for text in report["texts"]), report
    assert report["ratio"] <= 3.0, report
