"""Idle streams hold no server thread (issue 10, bug 3): a real server with 1 000 open WatchJob
streams and 200 stalled uploads still answers Health/Check and GetJob quickly, and ends each
stalled upload after its idle timeout with a clear status, leaving no file behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import JFK, ServerProcess
from tests.httpserver import serve_directory

pytestmark = pytest.mark.timeout(300)

WATCHERS = 1000
STALLED_UPLOADS = 200
CONNECTIONS = 10
IDLE_TIMEOUT_S = 20.0
PROBES = 200


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _probe_latencies(target: str, job_id: str) -> tuple[list[float], list[float]]:
    """Health/Check and GetJob, one after the other, from a channel of their own."""
    health_s: list[float] = []
    get_s: list[float] = []
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        jobs = pb_grpc.TranscriptionServiceStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connect first
        for _ in range(PROBES):
            t0 = time.perf_counter()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            health_s.append(time.perf_counter() - t0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            t0 = time.perf_counter()
            jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
            get_s.append(time.perf_counter() - t0)
    return health_s, get_s


async def _load_and_probe(target: str, job_id: str) -> dict[str, object]:
    # Separate connections, as many clients would have (one HTTP/2 connection each).
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)]
    stubs = [pb_grpc.TranscriptionServiceStub(c) for c in channels]
    release = asyncio.Event()
    try:
        watches = [stubs[i % CONNECTIONS].WatchJob(pb.WatchJobRequest(job_id=job_id))
                   for i in range(WATCHERS)]
        # Each stream is open once the server has replayed the job's first event to it.
        firsts = await asyncio.wait_for(asyncio.gather(*(w.read() for w in watches)), 120)
        assert all(e.job_id == job_id for e in firsts)

        async def stalled_upload() -> Exception | None:
            async def messages():  # type: ignore[no-untyped-def]
                yield pb.UploadRequest(metadata=pb.UploadMetadata(filename="stalled.flac"))
                yield pb.UploadRequest(chunk=b"fLaC" + bytes(1000))
                await release.wait()  # then nothing, until the server gives up

            try:
                await stubs[0].UploadAndSubmit(messages(), timeout=IDLE_TIMEOUT_S * 4)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

        started = time.monotonic()
        uploads = [asyncio.ensure_future(stalled_upload()) for _ in range(STALLED_UPLOADS)]
        await asyncio.sleep(3.0)  # every upload has sent its first bytes and stalled
        assert not any(u.done() for u in uploads)
        health_s, get_s = await asyncio.to_thread(_probe_latencies, target, job_id)
        assert not any(w.done() for w in watches), "a watch stream ended while idle"
        outcomes = await asyncio.wait_for(asyncio.gather(*uploads), IDLE_TIMEOUT_S * 3)
        ended_after = time.monotonic() - started
        for w in watches:
            w.cancel()
        return {"health_s": health_s, "get_s": get_s, "uploads": outcomes,
                "ended_after": ended_after}
    finally:
        release.set()
        await asyncio.gather(*(c.close() for c in channels))


def test_idle_streams_and_stalled_uploads_do_not_starve_the_server(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "jfk.flac").write_bytes(JFK.read_bytes())
    server = ServerProcess(tmp_path / "data", "--allow-private-networks",
                           "--upload-idle-timeout", str(IDLE_TIMEOUT_S)).start()
    try:
        with serve_directory(media) as http:
            http.throttle(2_000)  # the job sits in DOWNLOADING for the whole test
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.TranscriptionServiceStub(channel)
                job = stub.SubmitJob(pb.SubmitJobRequest(url=http.url_for("jfk.flac")),
                                     timeout=30)
                measured = asyncio.run(_load_and_probe(server.target, job.job_id))
                assert stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).state not in (
                    pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
                stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=30)
        health_p99, get_p99 = _p99(measured["health_s"]), _p99(measured["get_s"])  # type: ignore[arg-type]
        print(f"Health/Check p99 {health_p99 * 1000:.1f} ms, GetJob p99 {get_p99 * 1000:.1f} ms, "
              f"uploads ended after {measured['ended_after']:.1f} s")
        assert health_p99 < 0.1, f"Health/Check p99 {health_p99 * 1000:.0f} ms"
        assert get_p99 < 0.1, f"GetJob p99 {get_p99 * 1000:.0f} ms"
        errors = measured["uploads"]
        assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors), errors  # type: ignore[union-attr]
        codes = {e.code() for e in errors}  # type: ignore[union-attr]
        assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        assert all("upload_idle_timeout" in e.details() for e in errors)  # type: ignore[union-attr]
        assert measured["ended_after"] < IDLE_TIMEOUT_S * 2  # type: ignore[operator]
        # the stalled uploads' partial files are gone: only the URL job's folder may remain
        leftovers = [p for p in (tmp_path / "data" / "jobs").iterdir() if p.name != job.job_id]
        assert leftovers == []
        with grpc.insecure_channel(server.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
