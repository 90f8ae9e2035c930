"""Property-based fuzzing (hypothesis) of every RPC against one real server process (issue 5).

Random and malformed field values (unicode, NULs, huge strings, out-of-range numbers, invalid
enum values, broken upload sequences, random tokens) go to SubmitJob, UploadAndSubmit, WatchJob,
Transcribe, GetJob, ListJobs and CancelJob. Only documented status codes may come back, never
UNKNOWN or INTERNAL; a call without the right token is UNAUTHENTICATED whatever else it holds,
except a request message over the server's receive limit (8 MiB), which gRPC itself refuses
with RESOURCE_EXHAUSTED while receiving it, before the token check can answer (README, API);
and at the end the server still answers health SERVING and transcribes real speech.

A failure prints an `@reproduce_failure(...)` blob (print_blob) that replays the failing example
(add it above the property's `@given`); a failure hypothesis cannot replay prints a
`--hypothesis-seed=N` to rerun the module with instead. The time budget never skips the replay of
a property that has failed, so shrinking and the blob see the failure again.

Jobs a fuzzed call creates are cancelled at once (the server is started with queue limits far
above what the fuzz creates), so they never pile up. The whole module is bounded in time: each
property stops drawing work once the module's budget is spent.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from longscribe.client.client import LongscribeClient
from longscribe.service.server import UPLOAD_MESSAGE_LIMIT
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import JFK, ServerProcess, jfk_text, require_testdata, wer

pytestmark = pytest.mark.timeout(300)

TOKEN = "fuzz-token"
GOOD: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {TOKEN}"),)
ALLOWED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # only from our own short deadlines
    grpc.StatusCode.ALREADY_EXISTS,  # a request_id reused for a different request
})
# A job may also end with these (a fetch that cannot reach the internet, a cancel).
JOB_ERRORS = frozenset(c.name for c in ALLOWED) | {"UNAVAILABLE", "CANCELLED", "DATA_LOSS"}
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
SERVICE = "/longscribe.v1.TranscriptionService/"
CALL_TIMEOUT = 15.0
WATCH_TIMEOUT = 3.0
EXAMPLES = 100
BUDGET_S = 150.0  # for all the properties together; the last ones stop early if it runs out

FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the server and a recording caller -----------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_testdata()
    root = tmp_path_factory.mktemp("fuzz-media-root")
    shutil.copyfile(JFK, root / "jfk.flac")
    (root / "sub").mkdir()
    (root / "notes.txt").write_text("not media\n")
    return root


@dataclass
class Fuzzer:
    server: ServerProcess
    stub: pb_grpc.TranscriptionServiceStub
    channel: grpc.Channel
    deadline: float
    created: set[str] = field(default_factory=set)
    by_request: dict[str, str] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)  # method → status names seen
    failing: set[str] = field(default_factory=set)  # properties that have failed once

    def call(self, method: str, fn: Callable[[], Any], md: tuple[tuple[str, str], ...],
             request: Any = None) -> Any:
        """Run one call; check its status against the documented set and the token rule.
        `request`: the one request message of a unary-request call (stream-request calls are
        authenticated before any message is read, so their size never decides the status)."""
        try:
            reply, code, details = fn(), grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            reply, code, details = None, err.code(), err.details()  # type: ignore[attr-defined]
        self.seen.setdefault(method, set()).add(code.name)
        assert code in ALLOWED, f"{method} answered {code.name}: {details!r}"
        size = request.ByteSize() if request is not None else 0
        if size > UPLOAD_MESSAGE_LIMIT:
            # gRPC refuses it while receiving it: no handler (and so no token check) runs.
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"{method} with a {size}-byte request (limit {UPLOAD_MESSAGE_LIMIT}): {code}")
        elif md != GOOD:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (
                f"{method} without the token, {size}-byte request: {code}")
        else:
            assert code != grpc.StatusCode.UNAUTHENTICATED, f"{method} refused the right token"
        return reply

    def adopt(self, job: pb.Job, request_id: str) -> None:
        """A fuzzed call created (or returned) a job: check it, cancel it, wait for its end."""
        assert job.job_id
        if request_id:
            # Idempotency: one request_id, one job (a different request under the same id is
            # refused with ALREADY_EXISTS).
            assert self.by_request.setdefault(request_id, job.job_id) == job.job_id
            assert job.request_id == request_id
        self.created.add(job.job_id)
        self.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=GOOD,
                            timeout=CALL_TIMEOUT)
        ended = time.monotonic() + 30
        while True:
            got = self.stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=GOOD,
                                   timeout=CALL_TIMEOUT)
            if got.state in TERMINAL:
                break
            assert time.monotonic() < ended, f"cancelled job still {pb.JobState.Name(got.state)}"
            time.sleep(0.05)
        if got.state == pb.JOB_STATE_FAILED:
            assert got.error.code_name in JOB_ERRORS, got.error


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory, fuzz_root: Path) -> Iterator[Fuzzer]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("fuzz") / "data",
        "--auth-tokens", TOKEN, "--media-root", str(fuzz_root), "--workers", "2",
        "--max-queued-jobs", "100000", "--max-queued-jobs-per-client", "100000",
    )
    proc.start(wait=False)
    try:
        proc.wait_serving()
    except BaseException:
        proc.kill()
        raise
    channel = grpc.insecure_channel(proc.target, options=[
        ("grpc.max_send_message_length", 64 << 20)])
    yield Fuzzer(proc, pb_grpc.TranscriptionServiceStub(channel), channel,
                 time.monotonic() + BUDGET_S)
    channel.close()
    code = proc.stop()
    assert code == 0, f"server did not stop cleanly ({code}):\n{proc.log()[-3000:]}"


def budgeted(test: Callable[..., None]) -> Callable[..., None]:
    """Skip the property's examples once the module's time budget is spent, except when the
    property has failed: hypothesis replays a failing example to shrink it and to print its
    blob, and a replay skipped for time would pass and turn the failure into a flaky one."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        fuzzer: Fuzzer = kwargs["fuzzer"] if "fuzzer" in kwargs else args[0]
        if time.monotonic() > fuzzer.deadline and test.__name__ not in fuzzer.failing:
            return
        try:
            test(*args, **kwargs)
        except BaseException:
            fuzzer.failing.add(test.__name__)
            raise

    return run


# --- strategies ----------------------------------------------------------------------------------

def _text(max_size: int = 64) -> st.SearchStrategy[str]:
    # Any code point protobuf can carry (lone surrogates are not UTF-8), NUL and controls included.
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=max_size)


HUGE = st.tuples(
    st.sampled_from(["a", "é", "\x00", "/", "💥", "%", "."]),
    st.sampled_from([199, 200, 201, 2000, 2001, 4096, 4097, 100_000, 1_000_000]),
).map(lambda t: t[0] * t[1])
OVERSIZED = "a" * (9 << 20)  # over the server's 8 MiB message limit
ANY_TEXT = st.one_of(_text(), _text(400), HUGE)
HOSTS = st.one_of(
    st.sampled_from([
        "127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "0", "[::]",
        "93.184.216.34", "[2001:db8::1]", "example.com", "", "[", "]", "a..b", "xn--", "%00",
        "user:pw@127.0.0.1", "[fe80::1%25eth0]", "127.0.0.1\x00.example.com", "ｅｘａｍｐｌｅ.com",
        "a" * 64 + ".com", "a." * 200,
    ]),
    _text(40),
)
URLS = st.one_of(
    ANY_TEXT,
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
        st.sampled_from(["http", "https", "HTTP", "ftp", "file", "gopher", "data", "", "http:"]),
        HOSTS,
        st.one_of(st.just(""), st.integers(-5, 70_000).map(lambda p: f":{p}"),
                  _text(6).map(lambda p: ":" + p)),
        _text(40),
    ),
)
PATHS = st.one_of(
    ANY_TEXT,
    st.sampled_from([
        "jfk.flac", "./jfk.flac", "sub/../jfk.flac", "sub", "sub/", ".", "..", "../jfk.flac",
        "/etc/passwd", "notes.txt", "jfk.flac\x00.txt", "jfk.flac/", "~/x", "C:\\x",
        "\\\\server\\share\\x", "a" * 300, "a/" * 3000, "%2e%2e/jfk.flac",
    ]),
    st.lists(st.one_of(st.sampled_from(["..", ".", "", "sub", "jfk.flac"]), _text(12)),
             max_size=6).map("/".join),
)
OPTIONS = st.one_of(st.none(), st.builds(
    pb.TranscriptionOptions,
    language=st.one_of(st.sampled_from(["", "en", "EN", "english", "German", "de", "zz"]),
                       ANY_TEXT),
    task=st.one_of(st.sampled_from(["", "transcribe", "translate", "TRANSCRIBE"]), ANY_TEXT),
    initial_prompt=st.one_of(_text(), HUGE),
))
REQUEST_IDS = st.one_of(st.just(""), st.sampled_from(["r1", "r2", "é" * 200]), ANY_TEXT)
# Authorization values a client can send (printable ASCII), none of them the right token.
BAD_AUTH = st.one_of(
    st.just(()),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    .filter(lambda v: TOKEN not in v).map(lambda v: (("authorization", v),)),
    st.sampled_from([(("authorization", "Bearer"),), (("authorization", f"Basic {TOKEN}"),),
                     (("authorization", f"Bearer {TOKEN}x"),), (("x-token", TOKEN),)]),
)
AUTH = st.one_of(st.just(GOOD), st.just(GOOD), st.just(GOOD), BAD_AUTH)
JOB_IDS = st.one_of(st.just(""), st.text("0123456789abcdef", min_size=32, max_size=32), ANY_TEXT)
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 40))


@st.composite
def submit_requests(draw: st.DrawFn) -> pb.SubmitJobRequest:
    request = pb.SubmitJobRequest(options=draw(OPTIONS), request_id=draw(REQUEST_IDS))
    kind = draw(st.sampled_from(["url", "server_path", "none"]))
    if kind == "url":
        request.url = draw(URLS)
    elif kind == "server_path":
        request.server_path = draw(PATHS)
    return request


UPLOAD_METADATA = st.builds(
    pb.UploadMetadata,
    filename=st.one_of(_text(), HUGE, st.sampled_from(["../../x.flac", "a/b\\c.mp3", ".", ""])),
    options=OPTIONS,
    request_id=REQUEST_IDS,
    size_bytes=st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 5 << 30])),
)
CHUNKS = st.one_of(st.binary(max_size=4096), st.just(JFK.read_bytes()[:65536]), st.just(b""))
UPLOAD_MESSAGE = st.one_of(
    UPLOAD_METADATA.map(lambda m: pb.UploadRequest(metadata=m)),
    CHUNKS.map(lambda c: pb.UploadRequest(chunk=c)),
    st.just(pb.UploadRequest()),  # neither field set
)
UPLOAD_SEQUENCES = st.one_of(
    st.lists(UPLOAD_MESSAGE, max_size=6),  # anything, in any order
    st.tuples(UPLOAD_METADATA, st.lists(CHUNKS, max_size=4)).map(  # well formed, odd values
        lambda t: [pb.UploadRequest(metadata=t[0]), *(pb.UploadRequest(chunk=c) for c in t[1])]),
)


def _known_or(draw: st.DrawFn, fuzzer: Fuzzer, other: st.SearchStrategy[str]) -> str:
    if fuzzer.created and draw(st.booleans()):
        return draw(st.sampled_from(sorted(fuzzer.created)))
    return draw(other)


# --- one property per RPC ------------------------------------------------------------------------

@FUZZ
@given(request=submit_requests(), md=AUTH)
@example(request=pb.SubmitJobRequest(url=OVERSIZED), md=GOOD)
@example(request=pb.SubmitJobRequest(url=OVERSIZED), md=())  # refused before the token check
@example(request=pb.SubmitJobRequest(server_path="jfk.flac", request_id="r1"), md=GOOD)
@example(request=pb.SubmitJobRequest(url="http://a\x00b/x.mp3"), md=GOOD)
@budgeted
def test_fuzz_submit_job(fuzzer: Fuzzer, request: pb.SubmitJobRequest,
                         md: tuple[tuple[str, str], ...]) -> None:
    job = fuzzer.call("SubmitJob", lambda: fuzzer.stub.SubmitJob(
        request, metadata=md, timeout=CALL_TIMEOUT), md, request)
    if job is not None:
        fuzzer.adopt(job, request.request_id)


@FUZZ
@given(messages=UPLOAD_SEQUENCES, md=AUTH)
# A client stream is authenticated before its first message is read, whatever its size.
@example(messages=[pb.UploadRequest(metadata=pb.UploadMetadata(filename=OVERSIZED))], md=())
@example(messages=[pb.UploadRequest(metadata=pb.UploadMetadata(filename=OVERSIZED))], md=GOOD)
@budgeted
def test_fuzz_upload_and_submit(fuzzer: Fuzzer, messages: list[pb.UploadRequest],
                                md: tuple[tuple[str, str], ...]) -> None:
    job = fuzzer.call("UploadAndSubmit", lambda: fuzzer.stub.UploadAndSubmit(
        iter(messages), metadata=md, timeout=CALL_TIMEOUT), md)
    if job is not None:
        fuzzer.adopt(job, messages[0].metadata.request_id)


@FUZZ
@given(data=st.data(), from_index=INT64, md=AUTH)
@budgeted
def test_fuzz_watch_job(fuzzer: Fuzzer, data: st.DataObject, from_index: int,
                        md: tuple[tuple[str, str], ...]) -> None:
    job_id = _known_or(data.draw, fuzzer, JOB_IDS)
    request = pb.WatchJobRequest(job_id=job_id, from_index=from_index)

    def watch() -> list[pb.JobEvent]:
        return list(fuzzer.stub.WatchJob(request, metadata=md, timeout=WATCH_TIMEOUT))

    events = fuzzer.call("WatchJob", watch, md, request)
    if events:
        # A replay from any index: contiguous indices from there, all of this job.
        assert [e.index for e in events] == list(range(from_index, from_index + len(events)))
        assert {e.job_id for e in events} == {job_id}


@FUZZ
@given(request=submit_requests(), cancel=st.booleans(), md=AUTH)
# Issue 10: an oversized request without a token is RESOURCE_EXHAUSTED (gRPC's own refusal).
@example(request=pb.SubmitJobRequest(url=OVERSIZED), cancel=False, md=())
@budgeted
def test_fuzz_transcribe(fuzzer: Fuzzer, request: pb.SubmitJobRequest, cancel: bool,
                         md: tuple[tuple[str, str], ...]) -> None:

    sent = pb.TranscribeRequest(job=request, cancel_on_disconnect=cancel)

    def first_event() -> pb.JobEvent | None:
        call = fuzzer.stub.Transcribe(sent, metadata=md, timeout=CALL_TIMEOUT)
        try:
            return next(iter(call), None)
        finally:
            call.cancel()

    event = fuzzer.call("Transcribe", first_event, md, sent)
    if event is not None:
        fuzzer.adopt(fuzzer.stub.GetJob(pb.GetJobRequest(job_id=event.job_id), metadata=GOOD,
                                        timeout=CALL_TIMEOUT), request.request_id)


@FUZZ
@given(data=st.data(), include_result=st.booleans(), cancel=st.booleans(), md=AUTH)
@budgeted
def test_fuzz_get_and_cancel_job(fuzzer: Fuzzer, data: st.DataObject, include_result: bool,
                                 cancel: bool, md: tuple[tuple[str, str], ...]) -> None:
    job_id = _known_or(data.draw, fuzzer, JOB_IDS)
    if cancel:
        cancel_request = pb.CancelJobRequest(job_id=job_id)
        job = fuzzer.call("CancelJob", lambda: fuzzer.stub.CancelJob(
            cancel_request, metadata=md, timeout=CALL_TIMEOUT), md, cancel_request)
    else:
        get_request = pb.GetJobRequest(job_id=job_id, include_result=include_result)
        job = fuzzer.call("GetJob", lambda: fuzzer.stub.GetJob(
            get_request, metadata=md, timeout=CALL_TIMEOUT), md, get_request)
    if job is not None:
        assert job.job_id == job_id and job_id in fuzzer.created


@FUZZ
@given(
    page_size=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 3)),
    page_token=st.one_of(ANY_TEXT, st.integers(-(10**30), 10**30).map(str),
                         st.sampled_from(["", "0", "-1", " 7 ", "٣", "1_0", "9" * 5000])),
    states=st.lists(st.one_of(st.integers(0, 8), st.integers(-(2**31), 2**31 - 1)), max_size=5),
    md=AUTH,
)
@budgeted
def test_fuzz_list_jobs(fuzzer: Fuzzer, page_size: int, page_token: str, states: list[int],
                        md: tuple[tuple[str, str], ...]) -> None:
    request = pb.ListJobsRequest(page_size=page_size, page_token=page_token, states=states)
    page = fuzzer.call("ListJobs", lambda: fuzzer.stub.ListJobs(
        request, metadata=md, timeout=CALL_TIMEOUT), md, request)
    if page is None:
        return
    assert len(page.jobs) <= min(page_size or 50, 500)
    assert all(j.state in states for j in page.jobs) if states else True
    if page.next_page_token:  # a token the server issued is always accepted
        again = pb.ListJobsRequest(page_size=page_size, page_token=page.next_page_token,
                                   states=states)
        fuzzer.call("ListJobs", lambda: fuzzer.stub.ListJobs(
            again, metadata=md, timeout=CALL_TIMEOUT), md, again)


# --- options that pass validation, on real jobs run to the end -----------------------------------

@settings(max_examples=4, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    language=st.sampled_from(["", "en", "English", "de", "ja"]),
    task=st.sampled_from(["", "transcribe", "translate"]),
    prompt=st.one_of(_text(200), HUGE.filter(lambda s: len(s) <= 2000)),
)
@example(language="", task="", prompt="word " * 400)  # a prompt far over whisper's 224 tokens
@example(language="", task="", prompt="💥" * 2000)
@example(language="de", task="translate", prompt="\x00")  # translate on an English-only model
@budgeted
def test_fuzz_options_on_real_jobs(fuzzer: Fuzzer, language: str, task: str, prompt: str) -> None:
    """Options the server accepts must not break the job later: it succeeds or fails with a
    documented status, never INTERNAL. What the English-only model cannot do (another
    language, translation) is refused at once with INVALID_ARGUMENT."""
    options = pb.TranscriptionOptions(language=language, task=task, initial_prompt=prompt)
    english_only_cannot = task == "translate" or language.lower() not in ("", "en", "english")
    try:
        job = fuzzer.stub.SubmitJob(pb.SubmitJobRequest(server_path="jfk.flac", options=options),
                                    metadata=GOOD, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        assert english_only_cannot and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        return
    assert not english_only_cannot, f"{options} accepted by an English-only model"
    events = list(fuzzer.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=GOOD,
                                       timeout=120))
    last = events[-1]
    if last.HasField("error"):
        assert last.error.code_name in JOB_ERRORS - {"CANCELLED", "UNAVAILABLE"}, last.error
    else:
        assert last.HasField("result") and last.result.text.strip()


# --- malformed protobuf bytes --------------------------------------------------------------------

# Field 1 of every request here is a string or a message, except ListJobsRequest (page_size);
# its string is field 2 (page_token). Invalid UTF-8 there is malformed for proto3.
BAD_UTF8 = {"ListJobs": b"\x12\x02\xff\xfe"}
MALFORMED = [
    b"\x0a\x05ab",  # a length past the end of the message
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an over-long varint tag
    b"\x0b",  # a start-group tag that never ends
]
METHODS = {  # name → (client streaming, server streaming)
    "SubmitJob": (False, False), "UploadAndSubmit": (True, False), "WatchJob": (False, True),
    "Transcribe": (False, True), "GetJob": (False, False), "ListJobs": (False, False),
    "CancelJob": (False, False),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_malformed_protobuf_is_invalid_argument(fuzzer: Fuzzer, method: str) -> None:
    """Bytes that are not a valid request message: a client error (INVALID_ARGUMENT), not an
    INTERNAL one from the server."""
    streaming_in, streaming_out = METHODS[method]
    path = SERVICE + method
    for payload in [BAD_UTF8.get(method, b"\x0a\x02\xff\xfe"), *MALFORMED]:
        if streaming_in:
            call: Callable[[], Any] = lambda p=payload: fuzzer.channel.stream_unary(path)(  # noqa: E731
                iter([p]), metadata=GOOD, timeout=CALL_TIMEOUT)
        elif streaming_out:
            call = lambda p=payload: list(fuzzer.channel.unary_stream(path)(  # noqa: E731
                p, metadata=GOOD, timeout=CALL_TIMEOUT))
        else:
            call = lambda p=payload: fuzzer.channel.unary_unary(path)(  # noqa: E731
                p, metadata=GOOD, timeout=CALL_TIMEOUT)
        try:
            call()
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method} {payload!r}: {code.name}"


# --- huge fields echoed into error messages -----------------------------------------------------

LONG = "q" * 100_000
ECHOES: dict[str, tuple[str, Callable[[pb_grpc.TranscriptionServiceStub], Any],
                        set[grpc.StatusCode]]] = {
    "GetJob job_id": ("GetJob", lambda s: s.GetJob(pb.GetJobRequest(job_id=LONG), metadata=GOOD,
                                                   timeout=CALL_TIMEOUT),
                      {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}),
    "CancelJob job_id": ("CancelJob", lambda s: s.CancelJob(
        pb.CancelJobRequest(job_id=LONG), metadata=GOOD, timeout=CALL_TIMEOUT),
        {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}),
    "WatchJob job_id": ("WatchJob", lambda s: list(s.WatchJob(
        pb.WatchJobRequest(job_id=LONG), metadata=GOOD, timeout=CALL_TIMEOUT)),
        {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}),
    "SubmitJob server_path": ("SubmitJob", lambda s: s.SubmitJob(
        pb.SubmitJobRequest(server_path=LONG), metadata=GOOD, timeout=CALL_TIMEOUT),
        {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}),
    "SubmitJob ../server_path": ("SubmitJob", lambda s: s.SubmitJob(
        pb.SubmitJobRequest(server_path="../" + LONG), metadata=GOOD, timeout=CALL_TIMEOUT),
        {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}),
    "SubmitJob language": ("SubmitJob", lambda s: s.SubmitJob(pb.SubmitJobRequest(
        server_path="jfk.flac", options=pb.TranscriptionOptions(language=LONG)), metadata=GOOD,
        timeout=CALL_TIMEOUT), {grpc.StatusCode.INVALID_ARGUMENT}),
    "SubmitJob task": ("SubmitJob", lambda s: s.SubmitJob(pb.SubmitJobRequest(
        server_path="jfk.flac", options=pb.TranscriptionOptions(task=LONG)), metadata=GOOD,
        timeout=CALL_TIMEOUT), {grpc.StatusCode.INVALID_ARGUMENT}),
    "ListJobs page_token": ("ListJobs", lambda s: s.ListJobs(
        pb.ListJobsRequest(page_token=LONG), metadata=GOOD, timeout=CALL_TIMEOUT),
        {grpc.StatusCode.INVALID_ARGUMENT}),
}


@pytest.mark.parametrize("case", sorted(ECHOES))
def test_error_for_a_huge_field_keeps_its_status(fuzzer: Fuzzer, case: str) -> None:
    """A status message travels in a trailer, which clients cap (8 KiB by default): a server
    that echoes a 100 kB field into it makes the client see RESOURCE_EXHAUSTED ("received
    metadata size exceeds limit") instead of the real status and message."""
    _method, call, expected = ECHOES[case]
    with pytest.raises(grpc.RpcError) as err:
        call(fuzzer.stub)
    code, details = err.value.code(), err.value.details()  # type: ignore[attr-defined]
    assert code in expected, f"{code.name}: {details[:200]}"
    assert len(details) <= 4096


# --- afterwards: still serving -------------------------------------------------------------------

def test_server_still_serves_after_the_fuzz(fuzzer: Fuzzer) -> None:
    """Runs last in this module: health, a real transcription, and nothing left running."""
    assert fuzzer.server.proc is not None and fuzzer.server.proc.poll() is None
    reply = health_pb2_grpc.HealthStub(fuzzer.channel).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with LongscribeClient(fuzzer.server.target, token=TOKEN, timeout=30) as client:
        result = client.transcribe(str(JFK))
        assert wer(jfk_text(), result.text) <= 0.05, result.text
        open_jobs = [j for j in client.list() if j.state not in TERMINAL]
    assert open_jobs == [], "fuzzed jobs still open"
    assert fuzzer.created, "the fuzz never created a job: the strategies are too narrow"
    assert "internal error in RPC" not in fuzzer.server.log()
    print({m: sorted(codes) for m, codes in sorted(fuzzer.seen.items())})
