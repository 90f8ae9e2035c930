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
from longscribe.client.errors import LongscribeError
from longscribe.service.store import JobStore, StoredWindow
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import (
    JFK,
    LJ,
    TESTDATA,
    ServerProcess,
    ffmpeg,
    jfk_text,
    lj_text,
    require_testdata,
    wer,
)

pytestmark = pytest.mark.timeout(420)

# Small batches so windows finish a couple at a time and a stop lands between them; one worker
# so no other job shares the engine's batches (the clean and resumed runs batch alike).
SERVER_FLAGS = ("--batch-size", "2", "--workers", "1")
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
KILL_AFTER_WINDOWS = 2  # early: ffmpeg decodes ~2-3 min ahead and must still be running
TERM_AFTER_MORE_WINDOWS = 2
TAG = re.compile(r"⟦(k|t)(\d+)⟧")
LJ_SECONDS = 234.146  # the length of the LJSpeech file (testdata README)


# The long media: LJSpeech, then its first 17 sentences again (cut in the pause after
# LJ001-0017, which ends at 119.904 s): 5.9 min, about 16 windows. Long enough for two stops
# with windows on both sides of each, short enough for the CI budget on 2 CPU cores.
REPEAT_SENTENCES = 17
REPEAT_SECONDS = 120.1


def long_text() -> str:
    rows = (TESTDATA / "ljspeech_LJ001-0001_to_0032.segments.tsv").read_text().splitlines()[1:]
    again = [row.split("\t", 3)[3] for row in rows[:REPEAT_SENTENCES]]
    return lj_text() + " " + " ".join(again)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The media root: the long media as a 32 kbit/s mp3, and jfk.flac."""
    require_testdata()
    root = tmp_path_factory.mktemp("durable-media")
    total = LJ_SECONDS + REPEAT_SECONDS
    ffmpeg("-stream_loop", "1", "-i", str(LJ), "-t", f"{total:.3f}", "-ac", "1", "-b:a", "32k",
           str(root / "long.mp3"))
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


def _windows(db: Path, job_id: str) -> list[tuple[int, float, float]]:
    """(index, start, end) of the job's stored windows. JobStore on a live server's database is
    safe: WAL lets a second connection read, and its schema statements are no-ops there."""
    store = JobStore(db)
    try:
        return sorted((i, w.start, w.end) for i, w in store.load_windows(job_id).items())
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
    windows: list[tuple[int, float, float]]  # (index, start, end) as the server cut them


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
                        client.get(job_id, include_result=True),
                        _windows(fresh.data_dir / "jobs.sqlite3", job_id))


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
    assert wer(long_text(), clean_run.job.result.text) <= 0.08


def is_end(event: pb.JobEvent) -> bool:
    return event.HasField("result") or event.HasField("error")


# --- kill -9, restart, SIGTERM, restart ----------------------------------------------------------

@dataclass
class CrashRun:
    """What the crash-and-restart sequence observed; the tests below judge it."""

    job_id: str
    # after kill -9
    decoders_before_kill: list[str]
    alive_after_kill: list[str]  # the killed server's children still running
    naming_job_after_kill: list[str]  # any process still touching the job's files
    state_after_kill: int
    stored_at_kill: dict[int, int]  # window index → segments, as stored when killed
    # on the first restart
    retried_ids: list[str]  # job ids a retried upload / submit with the same request_id got
    listed_ids: list[str]
    reused_after_kill: int  # GetJob.chunks_reused once the restarted server moved on
    # SIGTERM during the first restart
    term_code: int
    term_seconds: float
    alive_after_term: list[str]
    state_after_term: int
    stored_at_term: dict[int, int]
    # the second restart, to the end
    result: pb.Result
    job: pb.Job
    events: list[pb.JobEvent]
    retried_after_end: pb.Job
    job_dir_left: bool
    windows: list[tuple[int, float, float]]  # all windows, stored across the three runs


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory, media: Path, clean_run: CleanRun
          ) -> CrashRun:
    """Run the long job on a second data dir: kill -9 it once a few windows are stored,
    restart, SIGTERM it a couple of windows later, restart, and let it finish. The clean run
    comes first so the two never share the CPU."""
    data = tmp_path_factory.mktemp("crash") / "data"
    db = data / "jobs.sqlite3"
    request_id = "durable-" + uuid.uuid4().hex

    # 1. Start the job; kill -9 the server once a few windows are stored.
    server = _server(data, media)
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            job_id = client.upload(media / "long.mp3", request_id=request_id).job_id
            _wait_job(client, job_id, lambda j: j.chunks_done >= KILL_AFTER_WINDOWS, 300,
                      f"{KILL_AFTER_WINDOWS} windows before the kill")
        children = _live_children(server.pid)
        decoders = [f"{c.pid} {c.name()}" for c in children if c.name() == "ffmpeg"]
        server.kill()
        assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
    finally:
        server.kill()  # no-op once dead
    # Orphans must die with the server's pipes (EPIPE), not only on a clean shutdown.
    alive_after_kill = _still_running(children, 10)
    naming_job = _processes_naming(job_id)
    state_after_kill, stored_at_kill = _tag_stored_windows(db, job_id, "k")

    # 2. Restart on the same data dir: the job resumes by itself.
    server = _server(data, media)
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            # Retries with the same request_id, as a client whose first call broke would send.
            retried = [client.upload(media / "long.mp3", request_id=request_id).job_id,
                       client.upload(media / "long.mp3", request_id=request_id).job_id]
            # the same id for another request is refused, not answered with this job
            with pytest.raises(LongscribeError) as reused:
                client.submit_path("jfk.flac", request_id=request_id)
            assert reused.value.code == grpc.StatusCode.ALREADY_EXISTS
            listed = [j.job_id for j in client.list()]
            resumed = _wait_job(
                client, job_id,
                lambda j: j.chunks_done >= len(stored_at_kill) + TERM_AFTER_MORE_WINDOWS, 300,
                "fresh windows after the restart")
            # 3. Graceful stop mid-job.
            children = _live_children(server.pid)
            started = time.monotonic()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            term_code = server.proc.wait(timeout=30)
            term_seconds = time.monotonic() - started
    finally:
        server.kill()
    alive_after_term = _still_running(children, 5)
    state_after_term, stored_at_term = _tag_stored_windows(db, job_id, "t")

    # 4. Restart again: the job completes.
    server = _server(data, media)
    try:
        with LongscribeClient(server.target, timeout=30) as client:
            result = client.wait(job_id)
            job = client.get(job_id)
            events = list(client.watch(job_id))
            again = client.upload(media / "long.mp3", request_id=request_id)
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    return CrashRun(
        job_id, decoders, alive_after_kill, naming_job, state_after_kill, stored_at_kill,
        retried, listed, resumed.chunks_reused, term_code, term_seconds, alive_after_term,
        state_after_term, stored_at_term, result, job, events, again,
        (data / "jobs" / job_id).exists(), _windows(db, job_id),
    )


def test_kill9_leaves_no_decoder_behind(crash: CrashRun) -> None:
    assert crash.decoders_before_kill, "no ffmpeg was running when the server was killed"
    assert crash.alive_after_kill == []
    assert crash.naming_job_after_kill == []
    assert crash.state_after_kill not in TERMINAL, pb.JobState.Name(crash.state_after_kill)
    assert len(crash.stored_at_kill) >= KILL_AFTER_WINDOWS
    assert sorted(crash.stored_at_kill) == list(range(len(crash.stored_at_kill)))


def test_resumed_job_reuses_exactly_the_stored_windows(crash: CrashRun) -> None:
    result, job = crash.result, crash.job
    assert job.state == pb.JOB_STATE_SUCCEEDED
    # After the kill, the restarted server reused exactly the windows stored before it.
    assert crash.reused_after_kill == len(crash.stored_at_kill) > 0
    assert job.chunks_reused == len(crash.stored_at_term)
    assert job.chunks_total == job.chunks_done == len(crash.windows)
    # Every stored window came back as stored (its tag is in the result); a window decoded
    # again would be untagged. Untagged segments are the windows decoded after the last start.
    tagged = {(m[1], int(m[2])) for s in result.segments if (m := TAG.match(s.text))}
    assert {i for g, i in tagged if g == "k"} == {i for i, n in crash.stored_at_kill.items() if n}
    assert {i for _, i in tagged} == {i for i, n in crash.stored_at_term.items() if n}
    tagged_segments = sum(bool(TAG.match(s.text)) for s in result.segments)
    assert tagged_segments == sum(crash.stored_at_term.values())
    assert job.chunks_total - job.chunks_reused > 0
    assert wer(long_text(), _untag(result.text)) <= 0.08
    # The media is kept until the job ends, then removed.
    assert not crash.job_dir_left


def test_resumed_windows_join_the_stored_ones_without_overlap(crash: CrashRun) -> None:
    """Windows cut after a restart must start where the stored ones ended: an overlap would
    transcribe the same speech twice. Resume matches stored windows by index only, so this
    holds only while every run cuts the same windows."""
    assert [i for i, _, _ in crash.windows] == list(range(len(crash.windows)))
    overlaps = [(a, b) for a, b in zip(crash.windows, crash.windows[1:], strict=False)
                if b[1] < a[2] - 1e-6]
    assert overlaps == []


def test_resumed_transcript_equals_the_clean_run(crash: CrashRun, clean_run: CleanRun) -> None:
    """Same windows, same text: segmentation and greedy decoding at temperature 0 are
    deterministic. (Windows that differ mean the segmenter is not reproducible, or its code
    changed between the two runs: a shared working tree being edited while tests run.)"""
    first = next(((a, b) for a, b in zip(clean_run.windows, crash.windows, strict=False)
                  if a != b), None)
    assert crash.windows == clean_run.windows, f"first different window (clean, resumed): {first}"
    assert _untag(crash.result.text) == clean_run.job.result.text
    assert _segments(crash.result) == _segments(clean_run.job.result)


def test_sigterm_mid_job_exits_cleanly_and_the_job_resumes(crash: CrashRun) -> None:
    assert crash.term_code == 0
    assert crash.term_seconds < 10.0, f"SIGTERM took {crash.term_seconds:.1f} s"
    assert crash.alive_after_term == []
    assert crash.state_after_term not in TERMINAL, pb.JobState.Name(crash.state_after_term)
    assert len(crash.stored_at_term) >= len(crash.stored_at_kill) + TERM_AFTER_MORE_WINDOWS
    assert crash.job.state == pb.JOB_STATE_SUCCEEDED


def test_submit_is_idempotent_across_restarts(crash: CrashRun) -> None:
    assert crash.retried_ids == [crash.job_id, crash.job_id]
    assert crash.listed_ids == [crash.job_id], "a retried submit created a second job"
    assert crash.retried_after_end.job_id == crash.job_id
    assert crash.retried_after_end.state == pb.JOB_STATE_SUCCEEDED


def test_event_log_survives_restarts(crash: CrashRun) -> None:
    indices = [e.index for e in crash.events]
    assert indices == list(range(crash.job.event_count)), "gap or repeat in the event log"
    assert [is_end(e) for e in crash.events].count(True) == 1
    assert crash.events[-1].HasField("result")


def test_resume_does_not_repeat_segment_events(crash: CrashRun) -> None:
    """A watcher that follows the job across the restarts must get each segment once: the
    segment events, in order, are the result's segments."""
    streamed = [(round(e.segment.start, 3), e.segment.text) for e in crash.events
                if e.HasField("segment")]
    final = [(round(s.start, 3), s.text) for s in crash.result.segments]
    assert len(streamed) == len(final), (
        f"{len(streamed)} segment events for {len(final)} segments")
    assert [(t, _untag(x)) for t, x in streamed] == [(t, _untag(x)) for t, x in final]


def test_watch_from_past_the_end_ends_with_the_job(fresh: ServerProcess) -> None:
    """WatchJob streams "until the job ends", whatever from_index was: a from_index past the
    last event gets an empty stream that closes when the job ends."""
    channel = grpc.insecure_channel(fresh.target)
    stub = pb_grpc.TranscriptionServiceStub(channel)
    try:
        job = stub.SubmitJob(pb.SubmitJobRequest(server_path="jfk.flac"), timeout=30)
        started = time.monotonic()
        try:
            events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id, from_index=1000),
                                        timeout=12))
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            events, code = [], err.code()  # type: ignore[attr-defined]
        state = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10).state
    finally:
        channel.close()
    assert state == pb.JOB_STATE_SUCCEEDED
    assert code == grpc.StatusCode.OK, f"{code.name} after {time.monotonic() - started:.0f} s"
    assert events == []


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
