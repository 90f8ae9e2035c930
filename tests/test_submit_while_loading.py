"""A job submitted while the model is still loading runs exactly once (issue 10).

The server opens its port before the model is loaded (health NOT_SERVING meanwhile) and takes
jobs into its queue. When the model is ready, the job manager starts its workers and resumes
the jobs it found in the store at start-up. It used to queue every unfinished job again there,
including the ones submitted while loading, so two workers ran the same job: two decoding and
transcribing passes, "succeeded" logged twice and segment events stored after the result.

Through a real server on 127.0.0.1 with the real model: a client submits the moment the port
opens, the job is watched to its end, the server is stopped gracefully (every worker done),
and the job's durable event log and the server log show one run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from longscribe.service.store import JobStore
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import ServerProcess, jfk_text, require_testdata, wer

pytestmark = pytest.mark.timeout(300)

# Reconnect fast: the default backoff (1 s, growing) could miss the ~1 s the model takes to load.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def test_job_submitted_while_the_model_loads_runs_once(tmp_path: Path, media_root: Path) -> None:
    require_testdata()
    data_dir = tmp_path / "data"
    # Two workers (the default): a job queued twice is then run twice at the same time.
    server = ServerProcess(data_dir, "--media-root", str(media_root), "--workers", "2")
    channel = grpc.insecure_channel(server.target, options=FAST_RECONNECT)
    server.start(wait=False)
    try:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        # wait_for_ready: the call waits for the port to open instead of failing UNAVAILABLE.
        job = stub.SubmitJob(pb.SubmitJobRequest(server_path="jfk.flac"), wait_for_ready=True,
                             timeout=120)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        # The scenario itself: the job was taken in before the model (and the workers) were up.
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING, (
            "the model was loaded before the job was submitted; the test did not exercise "
            "a submit during loading")
        watched = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=240))
        assert watched and watched[-1].HasField("result"), watched[-1:]
        assert wer(jfk_text(), watched[-1].result.text) <= 0.05, watched[-1].result.text
    finally:
        channel.close()
        code = server.stop()  # graceful: waits for the workers, so a second run shows up too
    assert code == 0, f"server did not stop cleanly ({code}):\n{server.log()[-3000:]}"

    store = JobStore(data_dir / "jobs.sqlite3")
    try:
        events = list(store.read_events(job.job_id, 0, 1 << 30))
    finally:
        store.close()
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds.count("result") == 1 and kinds[-1] == "result", kinds
    assert "error" not in kinds, kinds
    # One pass: each phase entered once, and one segment event per segment of the result.
    phases = Counter(e.progress.message for e in events
                     if e.HasField("progress") and e.progress.message)
    assert phases["decoding audio"] == 1 and phases["transcribing"] == 1, phases
    assert kinds.count("segment") == len(events[-1].result.segments), kinds
    log = server.log()
    assert log.count(f"job {job.job_id} succeeded") == 1, log[-3000:]
    assert f"job {job.job_id} stopped by shutdown" not in log, log[-3000:]
