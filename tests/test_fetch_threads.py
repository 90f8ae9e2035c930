"""How many threads a download costs, and how promptly and cleanly it stops (issue 10).

In process: the fetch package runs a streaming download on at most two threads, and neither
polls while the server is silent. Through a real server: a URL job decoded while it downloads
adds a bounded number of threads, and cancelling it mid-download ends the job at once with no
thread, temp file or child process left behind. Thread wake-ups are read from Linux's per-thread
voluntary context switch counters (/proc/PID/task/TID/status)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from longscribe.client.client import LongscribeClient, LongscribeError
from longscribe.service import fetch
from longscribe.service.errors import Cancelled
from longscribe.v1 import transcription_pb2 as pb

from tests.conftest import JFK, LJ, ServerProcess, ffmpeg, require_testdata
from tests.httpserver import LocalServer, serve_directory

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")

FAST = fetch.RetryPolicy(max_total_seconds=20.0, initial_wait=0.05, max_wait=0.2)
# A thread that sleeps in 50 ms slices wakes 20 times a second; one that waits on an event or
# on data from a silent server hardly at all.
POLLING_WAKEUPS_PER_SECOND = 8.0
# Threads a URL job decoded while it downloads may run in the server (and end with it): fetch,
# its cancel follower, ffmpeg's stdin feeder and stderr reader, the decode producer, the engine
# feeder, and one native thread the server starts per job.
MAX_THREADS_PER_STREAMING_URL_JOB = 7
# Of those, the ones that wake in short slices while the download trickles: the growing-file
# feeder, the decode producer and the engine feeder (service/audio.py, ingest.py, chunk_queue.py).
MAX_POLLING_THREADS_PER_STREAMING_URL_JOB = 3


def _wakeups(pid: int, tids: set[int]) -> dict[int, int]:
    counts = {}
    for tid in tids:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            line = next(s for s in status.splitlines() if s.startswith("voluntary_ctxt_switches"))
            counts[tid] = int(line.split()[1])
    return counts


def _wakeup_rates(pid: int, tids: set[int], seconds: float) -> dict[int, float]:
    before = _wakeups(pid, tids)
    time.sleep(seconds)
    after = _wakeups(pid, tids)
    return {t: (after[t] - before[t]) / seconds for t in before.keys() & after.keys()}


def _ours(threads: object) -> list[threading.Thread]:
    """Threads other than the in-process test HTTP server's request threads."""
    return [t for t in threads if "process_request_thread" not in t.name]  # type: ignore[attr-defined]


def _tids(pid: int) -> set[int]:
    return {t.id for t in psutil.Process(pid).threads()}


# --- the fetch package alone -----------------------------------------------------------------

@pytest.fixture(scope="module")
def jfk_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_testdata()
    folder = tmp_path_factory.mktemp("served-threads")
    ffmpeg("-i", str(JFK), "-ac", "1", "-b:a", "64k", str(folder / "jfk.mp3"))
    return folder


@pytest.fixture
def http(jfk_folder: Path) -> Iterator[LocalServer]:
    with serve_directory(jfk_folder) as s:
        yield s


def test_streaming_download_uses_two_threads_that_do_not_poll(
    http: LocalServer, tmp_path: Path
) -> None:
    http.throttle(200, chunk=4096)  # one chunk, then ~20 s of silence
    job_cancel = threading.Event()
    before = set(threading.enumerate())
    handle = fetch.start_download(http.url_for("jfk.mp3"), tmp_path / "dl", cancel=job_cancel,
                                  allow_private_networks=True, retry_policy=FAST)
    assert handle.file_ready.wait(10) and handle.partial_path is not None
    added = _ours(t for t in threading.enumerate() if t not in before and t.is_alive())
    assert len(added) <= 2, [t.name for t in added]
    assert {t.name for t in added} <= {"fetch", "fetch-cancel"}, [t.name for t in added]
    rates = _wakeup_rates(psutil.Process().pid, {t.native_id for t in added if t.native_id},
                          seconds=2.0)
    assert rates and max(rates.values()) < POLLING_WAKEUPS_PER_SECOND, rates
    cancelled_at = time.monotonic()
    job_cancel.set()
    with pytest.raises(Cancelled):
        handle.result(timeout=5)
    assert time.monotonic() - cancelled_at < 1.0
    assert list((tmp_path / "dl").iterdir()) == []  # no work folder, no early name
    deadline = time.monotonic() + 3  # the follower notices the end within its linger
    while time.monotonic() < deadline and any(t.is_alive() for t in added):
        time.sleep(0.05)
    assert not [t.name for t in added if t.is_alive()]


def test_download_without_a_cancel_event_adds_no_thread(
    http: LocalServer, jfk_folder: Path, tmp_path: Path
) -> None:
    before = set(threading.enumerate())
    seen: list[list[threading.Thread]] = []

    def progress(_: fetch.FetchProgress) -> None:
        seen.append(_ours(t for t in threading.enumerate() if t not in before))

    path = fetch.download(http.url_for("jfk.mp3"), tmp_path, allow_private_networks=True,
                          retry_policy=FAST, on_progress=progress)
    assert path.read_bytes() == (jfk_folder / "jfk.mp3").read_bytes()
    assert seen and not any(seen), seen


# --- through a real server -------------------------------------------------------------------

@pytest.fixture(scope="module")
def lj_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_testdata()
    folder = tmp_path_factory.mktemp("lj-threads")
    ffmpeg("-i", str(LJ), "-ac", "1", "-b:a", "64k", str(folder / "lj.mp3"))
    return folder


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own, so no other test's job changes its thread count."""
    proc = ServerProcess(tmp_path_factory.mktemp("threads-server") / "data",
                         "--allow-private-networks", "--workers", "1").start()
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]


def _children(pid: int) -> list[str]:
    names = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(child.name())
    return names


def _wait_for(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(condition())  # type: ignore[operator]


def _cancelled_streaming_job(client: LongscribeClient, http: LocalServer, server: ServerProcess
                              ) -> tuple[set[int], dict[int, float], float]:
    """A throttled mp3 URL job, cancelled while it is decoded during its download: the threads
    that appeared while it ran, their wake-ups per second, and the seconds its cancel took;
    checks it leaves no file or child process."""
    pid = server.pid
    before = _tids(pid)
    job = client.submit_url(http.url_for("lj.mp3"))
    events = client.watch(job.job_id)
    for event in events:
        if event.HasField("progress") and event.progress.phase == pb.JOB_STATE_TRANSCRIBING:
            break  # decoding the growing file: every helper of the job is running
        assert not event.HasField("error") and not event.HasField("result"), event
    job_dir = server.data_dir / "jobs" / job.job_id
    assert any(job_dir.glob("download/.fetch-*")), "the download is not under way"
    time.sleep(0.5)
    added = _tids(pid) - before
    rates = _wakeup_rates(pid, added, seconds=2.0)

    cancelled_at = time.monotonic()
    client.cancel(job.job_id)
    with pytest.raises(LongscribeError) as err:
        client.wait(job.job_id)
    took = time.monotonic() - cancelled_at
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert client.get(job.job_id).state == pb.JOB_STATE_CANCELLED
    # the download thread removes its work folder last; nothing else may be left either
    assert _wait_for(lambda: not job_dir.exists(), 3), list(job_dir.rglob("*"))
    assert not (server.data_dir / "tmp" / job.job_id).exists()
    assert _wait_for(lambda: not {"ffmpeg", "yt-dlp"} & set(_children(pid)), 3), _children(pid)
    return added, rates, took


def test_url_job_thread_bound_and_prompt_clean_cancel(own_server: ServerProcess,
                                                      lj_folder: Path) -> None:
    pid = own_server.pid
    with LongscribeClient(own_server.target, timeout=60) as client, \
            serve_directory(lj_folder) as http:
        # about half a minute for the whole file, in few large writes: the download itself
        # wakes its threads only a few times a second
        http.throttle(64_000, chunk=32_768)
        # the first job also grows the server's lazily started pools (RPC, blocking calls)
        _cancelled_streaming_job(client, http, own_server)
        time.sleep(1.5)  # past the cancel follower's linger
        baseline = _tids(pid)
        added, rates, took = _cancelled_streaming_job(client, http, own_server)
        assert took < 2.0, f"cancel took {took:.2f} s"
        # a pool may still grow by a thread that outlives the job; the job's own end with it
        assert _wait_for(lambda: len(_tids(pid) - baseline) <= 1, 3), _tids(pid) - baseline
        own = added - _tids(pid)
        assert len(own) <= MAX_THREADS_PER_STREAMING_URL_JOB, len(own)
        polling = [r for t, r in rates.items() if t in own and r >= POLLING_WAKEUPS_PER_SECOND]
        assert len(polling) <= MAX_POLLING_THREADS_PER_STREAMING_URL_JOB, sorted(rates.values())
