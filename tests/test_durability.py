"""Jobs that survive a crash, a restart and a dropped connection (issue 5, "What it must show"),
through real server processes on 127.0.0.1.

- A clean run of a long job on a fresh server, watched with a disconnect in the middle and a
  reconnect from the next event index: every later event arrives exactly once.
- The same media on a second data dir: `kill -9` mid-transcription, restart, graceful SIGTERM
  mid-transcription, restart; the job completes with the clean run's transcript, reusing every
  window finished before each stop and decoding only the others.
- Transcribe's cancel_on_disconnect flag, both ways.

How "not transcribed again" is shown: while the server is down, the test tags the text of every
window result already stored in the job's SQLite store (through `JobStore`, the server's own
store API). A window the restarted server reuses keeps its tag in the final transcript; a window
it decoded again would come back untagged. The tags are removed before comparing with the clean
run.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from longscribe.client.client import LongscribeClient
from longscribe.service.store import JobStore, StoredWindow
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import JFK, LJ, ServerProcess, ffmpeg, jfk_text, lj_text, require_testdata, wer

pytestmark = pytest.mark.timeout(420)

# Small batches so windows finish a couple at a time and a stop lands between them; one worker
# so no other job shares the engine's batches (the clean and resumed runs batch alike).
SERVER_FLAGS = ("--batch-size", "2", "--workers", "1")
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
KILL_AFTER_WINDOWS = 4
TERM_AFTER_MORE_WINDOWS = 2
TAG = re.compile(r"⟦(k|t)(\d+)⟧")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The media root: LJSpeech played twice (7.8 min) as a 32 kbit/s mp3, and jfk.flac."""
    require_testdata()
    root = tmp_path_factory.mktemp("durable-media")
    ffmpeg("-stream_loop", "1", "-i", str(LJ), "-ac", "1", "-b:a", "32k", str(root / "long.mp3"))
    shutil.copyfile(JFK, root / "jfk.flac")
    return root


def _server(data_dir: Path, media: Path) -> ServerProcess:
    proc = ServerProcess(data_dir, *SERVER_FLAGS, "--media-root", str(media))
    proc.start(wait=False)
    try:
        proc.wait_serving()
    except BaseException:
        proc.kill()
        raise
    return proc


def _wait_job(client: LongscribeClient, job_id: str, done: object, timeout: float = 300.0,
              what: str = "") -> pb.Job:
    """Poll GetJob until `done(job)`; fail with the last state after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(job_id)
        if done(job):  # type: ignore[operator]
            return job
        if job.state in TERMINAL or time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: job is {pb.JobState.Name(job.state)}, "
                        f"{job.chunks_done} windows done, error {job.error.message!r}")
        time.sleep(0.05)


def _live_children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _still_running(procs: list[psutil.Process], timeout: float) -> list[str]:
    """Of `procs`, those still alive (zombies count as gone) after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _processes_naming(text: str) -> list[str]:
    """Live processes whose command line mentions `text` (a job id: its files' paths)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(text in arg for arg in p.info["cmdline"] or ()):
            found.append(f"{p.info['pid']} {' '.join(p.info['cmdline'])}")
    return found


def _tag_stored_windows(db: Path, job_id: str, generation: str) -> tuple[int, dict[int, int]]:
    """With the server down: tag the segments of every stored window not tagged yet. Returns
    the job's stored state and {window index: number of segments} of all stored windows."""
    store = JobStore(db)
    try:
        (row,) = [r for r in store.load_jobs() if r.job_id == job_id]
        windows = store.load_windows(job_id)
        for index, window in windows.items():
            if any(TAG.match(s.text) for s in window.segments):
                continue  # stored before an earlier stop, tagged then
            tagged = []
            for seg in window.segments:
                copy = pb.Segment()
                copy.CopyFrom(seg)
                copy.text = f"⟦{generation}{index}⟧{seg.text}"
                tagged.append(copy)
            store.save_window(job_id, StoredWindow(index, window.start, window.end, tagged))
        return row.state, {i: len(w.segments) for i, w in windows.items()}
    finally:
        store.close()


def _untag(text: str) -> str:
    return TAG.sub("", text)


def _segments(result: pb.Result) -> list[tuple[float, float, str]]:
    return [(round(s.start, 3), round(s.end, 3), _untag(s.text)) for s in result.segments]


# --- the clean run, with a disconnect and a reconnect --------------------------------------------

@dataclass
class CleanRun:
    job_id: str
    before: list[pb.JobEvent]  # events read before the disconnect
    after: list[pb.JobEvent]  # events read after reconnecting from before[-1].index + 1
    replay: list[pb.JobEvent]  # the whole log, read again once the job ended
    windows_at_disconnect: int
    windows_while_away: int  # windows the job finished while no one watched
    job: pb.Job  # GetJob(include_result) at the end


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, media: Path) -> Iterator[ServerProcess]:
    proc = _server(tmp_path_factory.mktemp("fresh") / "data", media)
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]


@pytest.fixture(scope="module")
def clean_run(fresh: ServerProcess, media: Path) -> CleanRun:
    with LongscribeClient(fresh.target, timeout=30) as client:
        job_id = client.upload(media / "long.mp3").job_id
        channel = grpc.insecure_channel(fresh.target)
        before: list[pb.JobEvent] = []
        for event in pb_grpc.TranscriptionServiceStub(channel).WatchJob(
                pb.WatchJobRequest(job_id=job_id), timeout=300):
            before.append(event)
            if sum(e.HasField("segment") for e in before) >= 3:
                break  # transcription is under way
        channel.close()  # the disconnect: the stream goes with the channel
        at_disconnect = client.get(job_id).chunks_done
        # Nobody watches now; the job must go on regardless.
        away = _wait_job(client, job_id, lambda j: j.chunks_done > at_disconnect, 120,
                         "progress while no one watches")
        channel = grpc.insecure_channel(fresh.target)
        stub = pb_grpc.TranscriptionServiceStub(channel)
        try:
            after = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id,
                                                          from_index=before[-1].index + 1),
                                       timeout=300))
            replay = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60))
        finally:
            channel.close()
        return CleanRun(job_id, before, after, replay, at_disconnect, away.chunks_done,
                        client.get(job_id, include_result=True))


def test_watch_reconnect_gets_every_later_event_exactly_once(clean_run: CleanRun) -> None:
    before, after = clean_run.before, clean_run.after
    k = before[-1].index
    assert [e.index for e in before] == list(range(k + 1))
    assert [e.index for e in after] == list(range(k + 1, k + 1 + len(after))), "gap or repeat"
    assert after[-1].HasField("result") and not any(is_end(e) for e in after[:-1])
    # Exactly the events of the log, byte for byte, and nothing else.
    assert [e.SerializeToString() for e in before + after] == [
        e.SerializeToString() for e in clean_run.replay]
    assert clean_run.job.event_count == len(clean_run.replay)
    # The disconnect did not touch the job: it went on unwatched and succeeded.
    assert clean_run.windows_while_away > clean_run.windows_at_disconnect
    assert clean_run.job.state == pb.JOB_STATE_SUCCEEDED
    assert wer(lj_text() + " " + lj_text(), clean_run.job.result.text) <= 0.08


def is_end(event: pb.JobEvent) -> bool:
    return event.HasField("result") or event.HasField("error")


# --- kill -9, restart, SIGTERM, restart ----------------------------------------------------------

def test_kill9_and_sigterm_mid_job_resume_to_the_clean_transcript(
    tmp_path_factory: pytest.TempPathFactory, media: Path, clean_run: CleanRun,
) -> None:
    data = tmp_path_factory.mktemp("crash") / "data"
    db = data / "jobs.sqlite3"
    request_id = "durable-" + uuid.uuid4().hex

    # 1. Start the job and kill -9 the server once a few windows are stored.
    server = _server(data, media)
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            job_id = client.upload(media / "long.mp3", request_id=request_id).job_id
            _wait_job(client, job_id, lambda j: j.chunks_done >= KILL_AFTER_WINDOWS, 300,
                      f"{KILL_AFTER_WINDOWS} windows before the kill")
        children = _live_children(server.pid)
        assert any(p.name() == "ffmpeg" for p in children), "no decoder running mid-job"
        server.kill()
        assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
    finally:
        server.kill()  # no-op once dead
    # Orphans die with the server's pipes (EPIPE), not only on a clean shutdown.
    assert _still_running(children, 10) == []
    assert _processes_naming(job_id) == []
    state, stored_at_kill = _tag_stored_windows(db, job_id, "k")
    assert state not in TERMINAL, pb.JobState.Name(state)
    assert len(stored_at_kill) >= KILL_AFTER_WINDOWS
    assert sorted(stored_at_kill) == list(range(len(stored_at_kill))), "stored out of order"

    # 2. Restart on the same data dir: the job resumes by itself and reuses those windows.
    server = _server(data, media)
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            # Idempotent across the restart: a retried submit returns the same job.
            assert client.upload(media / "long.mp3", request_id=request_id).job_id == job_id
            assert client.submit_path("jfk.flac", request_id=request_id).job_id == job_id
            assert [j.job_id for j in client.list()] == [job_id]
            resumed = _wait_job(
                client, job_id,
                lambda j: j.chunks_done >= len(stored_at_kill) + TERM_AFTER_MORE_WINDOWS, 300,
                "fresh windows after the restart")
            assert resumed.chunks_reused == len(stored_at_kill)
            # 3. Graceful stop mid-job: exit 0 within seconds, the job is left resumable.
            children = _live_children(server.pid)
            started = time.monotonic()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=30)
            stopped_in = time.monotonic() - started
    finally:
        server.kill()
    assert code == 0, server.log()[-3000:]
    assert stopped_in < 8.0, f"SIGTERM took {stopped_in:.1f} s"
    assert _still_running(children, 5) == []
    state, stored_at_term = _tag_stored_windows(db, job_id, "t")
    assert state not in TERMINAL, f"SIGTERM left the job {pb.JobState.Name(state)}"
    assert len(stored_at_term) >= len(stored_at_kill) + TERM_AFTER_MORE_WINDOWS

    # 4. Restart again: the job completes.
    server = _server(data, media)
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            result = client.wait(job_id)
            job = client.get(job_id)
            events = list(client.watch(job_id))
            again = client.submit_path("jfk.flac", request_id=request_id)
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]
    assert job.state == pb.JOB_STATE_SUCCEEDED
    assert again.job_id == job_id and again.state == pb.JOB_STATE_SUCCEEDED

    # Every stored window was reused as stored (its tags are in the result), the others were
    # decoded again (untagged), and the counts agree.
    tagged = {(m[1], int(m[2])) for s in result.segments if (m := TAG.match(s.text))}
    assert {i for g, i in tagged if g == "k"} == {i for i, n in stored_at_kill.items() if n}
    assert {i for g, i in tagged} == {i for i, n in stored_at_term.items() if n}
    tagged_segments = sum(bool(TAG.match(s.text)) for s in result.segments)
    assert tagged_segments == sum(stored_at_term.values())
    assert job.chunks_reused == len(stored_at_term)
    assert job.chunks_total == job.chunks_done == clean_run.job.chunks_total
    new_windows = job.chunks_total - job.chunks_reused
    assert new_windows > 0
    assert len(result.segments) - tagged_segments == len(clean_run.job.result.segments) - sum(
        stored_at_term.values()), "windows decoded after the last restart"

    # The transcript equals the clean run's (the engine is deterministic at temperature 0).
    assert _untag(result.text) == clean_run.job.result.text
    assert _segments(result) == _segments(clean_run.job.result)

    # The event log survived both stops: contiguous, one terminal event, at the end.
    assert [e.index for e in events] == list(range(job.event_count))
    assert [is_end(e) for e in events].count(True) == 1 and events[-1].HasField("result")
    # The media is kept until the job ends, then removed.
    assert not (data / "jobs" / job_id).exists()


# --- Transcribe: cancel_on_disconnect ------------------------------------------------------------

def test_transcribe_cancel_on_disconnect_cancels_the_job(fresh: ServerProcess) -> None:
    channel = grpc.insecure_channel(fresh.target)
    call = pb_grpc.TranscriptionServiceStub(channel).Transcribe(pb.TranscribeRequest(
        job=pb.SubmitJobRequest(server_path="long.mp3", request_id=uuid.uuid4().hex),
        cancel_on_disconnect=True), timeout=300)
    job_id = ""
    for event in call:
        job_id = event.job_id
        if event.HasField("segment"):
            break  # transcribing now
    call.cancel()
    channel.close()
    dropped = time.monotonic()
    with LongscribeClient(fresh.target, timeout=30) as client:
        job = _wait_job(client, job_id, lambda j: j.state in TERMINAL, 30, "the cancel")
    assert job.state == pb.JOB_STATE_CANCELLED, job
    assert job.error.code_name == "CANCELLED"
    assert time.monotonic() - dropped < 10.0
    assert job.chunks_done < 10, "the job ran on long after the disconnect"


def test_transcribe_without_cancel_on_disconnect_runs_to_the_end(fresh: ServerProcess) -> None:
    channel = grpc.insecure_channel(fresh.target)
    call = pb_grpc.TranscriptionServiceStub(channel).Transcribe(pb.TranscribeRequest(
        job=pb.SubmitJobRequest(server_path="jfk.flac", request_id=uuid.uuid4().hex),
        cancel_on_disconnect=False), timeout=300)
    first = next(iter(call))
    assert first.state not in TERMINAL  # dropped while the job is still to run
    call.cancel()
    channel.close()
    with LongscribeClient(fresh.target, timeout=30) as client:
        result = client.wait(first.job_id)
    assert wer(jfk_text(), result.text) <= 0.05
