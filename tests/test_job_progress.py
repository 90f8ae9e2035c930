"""The progress rules of one job (service/job_progress.py), on a fake clock."""

from __future__ import annotations

from longscribe.service.job_progress import PROGRESS_INTERVAL_S, ProgressGate
from longscribe.v1 import transcription_pb2 as pb

DOWNLOADING, DECODING, TRANSCRIBING = (pb.JOB_STATE_DOWNLOADING, pb.JOB_STATE_DECODING,
                                       pb.JOB_STATE_TRANSCRIBING)


def test_phase_never_goes_back_and_percent_never_down() -> None:
    gate = ProgressGate()
    assert gate.admit(TRANSCRIBING, 40.0, DOWNLOADING, False, now=1.0) == (TRANSCRIBING, 40.0)
    # a download thread reporting late: raised to the phase the job has reached
    assert gate.admit(DOWNLOADING, 20.0, TRANSCRIBING, True, now=2.0) == (TRANSCRIBING, 40.0)
    assert gate.admit(TRANSCRIBING, 150.0, TRANSCRIBING, True, now=3.0) == (TRANSCRIBING, 100.0)


def test_same_phase_is_rate_limited_unless_forced() -> None:
    gate = ProgressGate()
    assert gate.admit(DECODING, 1.0, DECODING, False, now=10.0) is not None
    assert gate.admit(DECODING, 2.0, DECODING, False, now=10.0 + PROGRESS_INTERVAL_S / 2) is None
    assert gate.admit(DECODING, 3.0, DECODING, True, now=10.0 + PROGRESS_INTERVAL_S / 2)
    assert gate.admit(DECODING, 4.0, DECODING, False, now=11.0) == (DECODING, 4.0)
    # a phase change always passes
    assert gate.admit(TRANSCRIBING, 5.0, DECODING, False, now=11.0) == (TRANSCRIBING, 5.0)


def test_a_resumed_run_walks_its_phases_again_but_keeps_its_percent() -> None:
    gate = ProgressGate(max_percent=60.0)
    gate.admit(TRANSCRIBING, 60.0, TRANSCRIBING, True, now=1.0)
    gate.restart()
    assert gate.admit(DECODING, 0.0, pb.JOB_STATE_QUEUED, True, now=2.0) == (DECODING, 60.0)
