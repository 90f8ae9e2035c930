"""Security through real server processes (issue 5, "What it must show"): bearer tokens over TLS
(Python client and grpcurl), SSRF refusals with a local HTTP server that must never be hit,
media-root confinement (``..`` and symlinks), and the configured limits and deadlines.

Two servers for the whole module (each start loads the model, so they are shared):

- ``secure``: TLS with the test PKI, ``--auth-tokens``, a media root, private networks NOT
  allowed. Auth, grpcurl-over-TLS, SSRF and path tests run here.
- ``limited``: plaintext, three tokens (three clients), private networks allowed (its downloads
  come from 127.0.0.1) and small limits: upload bytes, media duration, queued jobs overall and
  per client. Limit and deadline tests run here.

Covered elsewhere, not repeated here (the resolver override lives inside a process, so a server
process cannot be pointed at it): a public-looking name resolving to 10.x
(tests/test_netguard.py, tests/test_fetch.py::test_public_looking_name_resolving_private) and a
redirect from an allowed host to a private one (tests/test_fetch.py::
test_redirect_to_private_target_is_refused). A server started with --allow-private-networks
allows both ends of such a redirect, and one without it has no reachable allowed host here (no
internet), so neither can be shown through a server process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from longscribe.client.client import LongscribeClient, LongscribeError
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

from tests.conftest import JFK, TESTDATA, ServerProcess, jfk_text, require_testdata, wer
from tests.grpcurl import run_grpcurl
from tests.httpserver import LocalServer, serve_directory
from tests.pki import TestPki, make_pki

pytestmark = pytest.mark.timeout(180)

SERVICE = "longscribe.v1.TranscriptionService"
TOKEN = "secret-token"
# Three clients of the limited server: the per-client limit is counted per token.
TOKEN_A, TOKEN_B, TOKEN_C = "limits-token-a", "limits-token-b", "limits-token-c"
MAX_UPLOAD = 400_000  # bytes: jfk.flac (1.15 MB) is over, the short LibriSpeech wavs are under
MAX_DURATION = 5  # seconds: 1995-1837-0001.wav (8.7 s) is over, 1221-135766-0002.wav (4.8 s) under
OVER_DURATION = TESTDATA / "1995-1837-0001.wav"
UNDER_DURATION = TESTDATA / "1221-135766-0002.wav"
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _start(proc: ServerProcess, credentials: grpc.ChannelCredentials | None = None
           ) -> ServerProcess:
    """Start and wait for SERVING; never leave a half-started process behind."""
    proc.start(wait=False)
    try:
        proc.wait_serving(credentials=credentials)
    except BaseException:
        proc.kill()
        raise
    return proc


def _stop(proc: ServerProcess) -> None:
    code = proc.stop()
    assert code == 0, f"server did not stop cleanly ({code}):\n{proc.log()[-3000:]}"


def _wait_state(client: LongscribeClient, job_id: str, states: set[int], timeout: float = 60.0
                ) -> pb.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(job_id)
        if job.state in states or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


# --- the secure server: TLS + token, no private networks ----------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the media root holding a readable media file (what an escape would
    reach)."""
    require_testdata()
    folder = tmp_path_factory.mktemp("outside-root")
    shutil.copyfile(JFK, folder / "secret.flac")
    return folder


@pytest.fixture(scope="module")
def secure_root(tmp_path_factory: pytest.TempPathFactory, outside: Path) -> Path:
    root = tmp_path_factory.mktemp("secure-media-root")
    shutil.copyfile(JFK, root / "jfk.flac")
    (root / "sub").mkdir()
    os.symlink(outside / "secret.flac", root / "link-out.flac")  # file link out of the root
    os.symlink(outside, root / "dir-out")  # folder link out of the root
    os.symlink("sub/../jfk.flac", root / "sub-link.flac")  # relative link that stays inside
    return root


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, pki: TestPki, secure_root: Path
           ) -> Iterator[ServerProcess]:
    require_testdata()
    proc = ServerProcess(
        tmp_path_factory.mktemp("secure") / "data",
        "--auth-tokens", TOKEN, "--media-root", str(secure_root),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    )
    _start(proc, grpc.ssl_channel_credentials(pki.ca_pem()))
    yield proc
    _stop(proc)


@pytest.fixture()
def secure_client(secure: ServerProcess, pki: TestPki) -> Iterator[LongscribeClient]:
    with LongscribeClient(secure.target, token=TOKEN, tls_ca=str(pki.ca_cert), timeout=30) as c:
        yield c


@pytest.fixture()
def secure_stub(secure: ServerProcess, pki: TestPki
                ) -> Iterator[pb_grpc.TranscriptionServiceStub]:
    """A raw stub over TLS that sends no metadata unless a call passes some."""
    channel = grpc.secure_channel(secure.target, grpc.ssl_channel_credentials(pki.ca_pem()))
    yield pb_grpc.TranscriptionServiceStub(channel)
    channel.close()


def _every_rpc(stub: pb_grpc.TranscriptionServiceStub, metadata: tuple[tuple[str, str], ...],
               marker: str) -> dict[str, grpc.StatusCode]:
    """Call every TranscriptionService method once with `metadata`; the status of each. The
    submitting calls carry `marker` as request_id, so a caller can check nothing was created."""
    submit = pb.SubmitJobRequest(server_path="jfk.flac", request_id=marker)

    def upload() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(metadata=pb.UploadMetadata(filename="jfk.flac",
                                                          request_id=marker + "-upload"))
        yield pb.UploadRequest(chunk=JFK.read_bytes()[:65536])

    calls = {
        "SubmitJob": lambda: stub.SubmitJob(submit, metadata=metadata, timeout=10),
        "UploadAndSubmit": lambda: stub.UploadAndSubmit(upload(), metadata=metadata, timeout=10),
        "WatchJob": lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="x"),
                                               metadata=metadata, timeout=10)),
        "Transcribe": lambda: list(stub.Transcribe(
            pb.TranscribeRequest(job=pb.SubmitJobRequest(server_path="jfk.flac",
                                                         request_id=marker + "-t")),
            metadata=metadata, timeout=10)),
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(job_id="x"), metadata=metadata,
                                      timeout=10),
        "ListJobs": lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=metadata, timeout=10),
        "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(job_id="x"),
                                            metadata=metadata, timeout=10),
    }
    codes: dict[str, grpc.StatusCode] = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            codes[name] = err.code()  # type: ignore[attr-defined]
            assert err.details() in ("missing bearer token: send 'authorization: Bearer "  # type: ignore[attr-defined]
                                     "<token>' metadata", "invalid bearer token"), err
    return codes


def _request_ids(client: LongscribeClient) -> set[str]:
    return {j.request_id for j in client.list()}


def test_no_token_is_unauthenticated(secure_stub: pb_grpc.TranscriptionServiceStub,
                                     secure_client: LongscribeClient) -> None:
    marker = "no-token-" + uuid.uuid4().hex
    codes = _every_rpc(secure_stub, (), marker)
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    # Refused before the servicer ran: no job exists under any of those request ids.
    assert not {i for i in _request_ids(secure_client) if i.startswith(marker)}


@pytest.mark.parametrize("header", [
    "Bearer wrong-token",
    f"Bearer {TOKEN}x",  # a longer token with the right prefix
    f"Bearer {TOKEN[:-1]}",  # a prefix of the right token
    f"Basic {TOKEN}",  # the right secret under another scheme
    "Bearer",
])
def test_wrong_token_is_unauthenticated(secure_stub: pb_grpc.TranscriptionServiceStub,
                                        secure_client: LongscribeClient, header: str) -> None:
    marker = "wrong-token-" + uuid.uuid4().hex
    codes = _every_rpc(secure_stub, (("authorization", header),), marker)
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    assert not {i for i in _request_ids(secure_client) if i.startswith(marker)}


def test_wrong_token_through_the_client_library(secure: ServerProcess, pki: TestPki) -> None:
    with LongscribeClient(secure.target, token="not-the-token", tls_ca=str(pki.ca_cert),
                          timeout=10) as client, pytest.raises(LongscribeError) as err:
        client.submit_path("jfk.flac")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid bearer token" in err.value.message


def test_right_token_transcribes_jfk_over_tls(secure_client: LongscribeClient) -> None:
    result = secure_client.transcribe(str(JFK))
    assert wer(jfk_text(), result.text) <= 0.05, result.text


def test_health_and_reflection_open_without_token(secure: ServerProcess, pki: TestPki) -> None:
    channel = grpc.secure_channel(secure.target, grpc.ssl_channel_credentials(pki.ca_pem()))
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    finally:
        channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ca = ("-cacert", str(pki.ca_cert))
    listing = run_grpcurl(*ca, secure.target, "list")
    assert listing.returncode == 0, listing.stderr
    assert {SERVICE, "grpc.health.v1.Health"} <= set(listing.stdout.split())
    described = run_grpcurl(*ca, secure.target, "describe", SERVICE)
    assert described.returncode == 0 and "rpc SubmitJob" in described.stdout, described.stderr
    check = run_grpcurl(*ca, secure.target, "grpc.health.v1.Health/Check")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["status"] == "SERVING"


def test_grpcurl_submit_over_tls_with_token(secure: ServerProcess, pki: TestPki,
                                            secure_client: LongscribeClient) -> None:
    ca = ("-cacert", str(pki.ca_cert))
    bearer = ("-H", f"authorization: Bearer {TOKEN}")
    body = json.dumps({"serverPath": "jfk.flac", "requestId": "grpcurl-" + uuid.uuid4().hex})
    refused = run_grpcurl(*ca, "-d", body, secure.target, f"{SERVICE}/SubmitJob")
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr and "missing bearer token" in refused.stderr
    submitted = run_grpcurl(*ca, *bearer, "-d", body, secure.target, f"{SERVICE}/SubmitJob")
    assert submitted.returncode == 0, submitted.stderr
    # grpcurl prints proto field names or JSON names, depending on the descriptors it gets.
    reply = json.loads(submitted.stdout)
    job_id = reply.get("jobId") or reply["job_id"]
    got = run_grpcurl(*ca, *bearer, "-d", json.dumps({"jobId": job_id}), secure.target,
                      f"{SERVICE}/GetJob")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["source"] == "path:jfk.flac"
    # The job grpcurl started is a real one: it transcribes.
    assert wer(jfk_text(), secure_client.wait(job_id).text) <= 0.05


# --- SSRF: the secure server does not allow private networks -----------------------------------

@pytest.fixture(scope="module")
def bait(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real HTTP server on 127.0.0.1 with a real media file: any request it logs is a fetch
    the server should never have made."""
    folder = tmp_path_factory.mktemp("bait")
    shutil.copyfile(JFK, folder / "x.mp3")
    with serve_directory(folder) as http:
        yield http


def _own_hostname_if_private() -> list[str]:
    """This machine's name when it resolves (through the real resolver, no override) to a
    non-public address: a host *name*, not a literal, that must be refused."""
    import ipaddress

    name = socket.gethostname()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        return []
    private = addrs and all(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addrs)
    return [f"http://{name}:{{port}}/x.mp3"] if private else []


# (url template, expected code, words the message must contain)
DENIED = "PERMISSION_DENIED"
INVALID = "INVALID_ARGUMENT"
SSRF_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("http://127.0.0.1:{port}/x.mp3", DENIED, ("127.0.0.1", "loopback", "--allow-private")),
    ("HTTP://127.0.0.1:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://user:pw@127.0.0.1:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://localhost:{port}/x.mp3", DENIED, ("localhost", "not a public address")),
    # Other spellings of 127.0.0.1 that resolvers accept.
    ("http://127.1:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://2130706433:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://0x7f000001:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://[::ffff:127.0.0.1]:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://0.0.0.0:{port}/x.mp3", DENIED, ("not a public address",)),
    ("http://[::1]/", DENIED, ("::1", "loopback")),
    ("http://[::1]:{port}/x.mp3", DENIED, ("loopback",)),
    ("http://169.254.169.254/", DENIED, ("169.254.169.254", "metadata")),
    ("http://169.254.169.254/latest/meta-data/iam/", DENIED, ("metadata",)),
    ("http://[fd00:ec2::254]/", DENIED, ("metadata",)),
    ("http://10.0.0.5/x.mp3", DENIED, ("private",)),
    ("http://192.168.1.1/x.mp3", DENIED, ("private",)),
    ("file:///etc/passwd", INVALID, ("only http:// and https://", "file:")),
    ("ftp://127.0.0.1:{port}/x.mp3", INVALID, ("only http:// and https://", "ftp:")),
    ("ftp://ftp.example.com/x.mp3", INVALID, ("ftp:",)),
    ("gopher://127.0.0.1:{port}/_x", INVALID, ("gopher:",)),
    ("127.0.0.1:{port}/x.mp3", INVALID, ("only http:// and https://",)),
] + [(u, DENIED, ("not a public address",)) for u in _own_hostname_if_private()]


@pytest.mark.parametrize(("template", "code", "words"), SSRF_CASES)
def test_ssrf_refused_at_submit_and_nothing_fetched(
    secure_client: LongscribeClient, bait: LocalServer, template: str, code: str,
    words: tuple[str, ...],
) -> None:
    url = template.format(port=bait.port)
    before = len(list(secure_client.list()))
    with pytest.raises(LongscribeError) as err:
        secure_client.submit_url(url)
    assert err.value.code.name == code, err.value
    for word in words:
        assert word in err.value.message, err.value.message
    assert bait.log == [], f"the server fetched {bait.log}"
    assert len(list(secure_client.list())) == before, "a refused URL created a job"


def test_ssrf_refused_through_transcribe_too(secure: ServerProcess, pki: TestPki,
                                             bait: LocalServer) -> None:
    """Transcribe submits through the same check as SubmitJob."""
    channel = grpc.secure_channel(secure.target, grpc.ssl_channel_credentials(pki.ca_pem()))
    try:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        request = pb.TranscribeRequest(job=pb.SubmitJobRequest(url=bait.url_for("x.mp3")),
                                       cancel_on_disconnect=True)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Transcribe(request, metadata=_bearer(TOKEN), timeout=10))
    finally:
        channel.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "loopback" in err.value.details()  # type: ignore[attr-defined]
    assert bait.log == []


# --- paths: confined to the media root ---------------------------------------------------------

@pytest.mark.parametrize("path", [
    "../{outside}/secret.flac",  # a real, readable file next to the root
    "../" * 12 + "etc/passwd",
    "sub/../../jfk.flac",
    "./../jfk.flac",
    "..\\jfk.flac",
    "sub\\..\\..\\jfk.flac",
    "/etc/passwd",
    "link-out.flac",  # a symlink inside the root to a readable file outside it
    "dir-out/secret.flac",  # through a symlinked folder
    "dir-out/no-such-file.flac",  # refused before existence is checked: no probing outside
])
def test_paths_outside_the_media_root_are_denied(secure_client: LongscribeClient,
                                                 outside: Path, path: str) -> None:
    path = path.format(outside=outside.name)
    with pytest.raises(LongscribeError) as err:
        secure_client.submit_path(path)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value
    assert "media root" in err.value.message and repr(path) in err.value.message


def test_symlink_that_stays_inside_the_root_is_allowed(secure_client: LongscribeClient) -> None:
    """The control for the refusals above: links are followed, only escapes are refused."""
    job = secure_client.submit_path("sub-link.flac")
    secure_client.cancel(job.job_id)
    assert _wait_state(secure_client, job.job_id, TERMINAL).state in TERMINAL


# --- limits and deadlines ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_testdata()
    proc = ServerProcess(
        tmp_path_factory.mktemp("limited") / "data",
        "--allow-private-networks", "--auth-tokens", f"{TOKEN_A},{TOKEN_B},{TOKEN_C}",
        "--max-upload-bytes", str(MAX_UPLOAD), "--max-duration-seconds", str(MAX_DURATION),
        "--max-queued-jobs", "2", "--max-queued-jobs-per-client", "1",
    )
    _start(proc)
    yield proc
    _stop(proc)


def _limited_client(server: ServerProcess, token: str) -> LongscribeClient:
    return LongscribeClient(server.target, token=token, timeout=30)


def _names_limit(message: str, name: str) -> bool:
    return name in message.replace("-", "_")


def test_declared_upload_over_the_limit_is_refused_up_front(limited: ServerProcess) -> None:
    assert JFK.stat().st_size > MAX_UPLOAD
    with _limited_client(limited, TOKEN_A) as client, pytest.raises(LongscribeError) as err:
        client.upload(str(JFK))  # declares size_bytes
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _names_limit(err.value.message, "max_upload_bytes"), err.value.message
    assert str(MAX_UPLOAD) in err.value.message.replace(",", "")


def test_undeclared_upload_over_the_limit_is_cut_off(limited: ServerProcess) -> None:
    """No size_bytes: the server counts the bytes as they arrive and stops at the limit."""
    channel = grpc.insecure_channel(limited.target)
    data = JFK.read_bytes()

    def requests() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(metadata=pb.UploadMetadata(filename="jfk.flac"))
        for i in range(0, len(data), 64 * 1024):
            yield pb.UploadRequest(chunk=data[i:i + 64 * 1024])

    try:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadAndSubmit(requests(), metadata=_bearer(TOKEN_A), timeout=30)
    finally:
        channel.close()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert _names_limit(err.value.details(), "max_upload_bytes")  # type: ignore[attr-defined]
    # The partial upload is gone.
    assert list((limited.data_dir / "jobs").rglob("jfk*")) == []


def test_download_over_the_limit_fails_the_job(limited: ServerProcess, tmp_path: Path) -> None:
    shutil.copyfile(JFK, tmp_path / "big.flac")
    with serve_directory(tmp_path) as http, _limited_client(limited, TOKEN_A) as client:
        job = client.submit_url(http.url_for("big.flac"))
        with pytest.raises(LongscribeError) as err:
            client.wait(job.job_id)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _names_limit(err.value.message, "max_upload_bytes"), err.value.message


def test_media_over_the_duration_limit_fails_the_job(limited: ServerProcess) -> None:
    assert OVER_DURATION.stat().st_size < MAX_UPLOAD
    with _limited_client(limited, TOKEN_A) as client:
        job = client.upload(str(OVER_DURATION))
        with pytest.raises(LongscribeError) as err:
            client.wait(job.job_id)
        final = client.get(job.job_id)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _names_limit(err.value.message, "max_duration_seconds"), err.value.message
    assert final.state == pb.JOB_STATE_FAILED
    assert final.error.code_name == "RESOURCE_EXHAUSTED"


def test_media_under_the_limits_still_transcribes(limited: ServerProcess) -> None:
    """The control: the limits refuse what is over them, not everything."""
    with _limited_client(limited, TOKEN_A) as client:
        result = client.transcribe(str(UNDER_DURATION))
    reference = "YET THESE THOUGHTS AFFECTED HESTER PRYNNE LESS WITH HOPE THAN APPREHENSION"
    assert wer(reference, result.text) <= 0.25, result.text
    assert result.duration_seconds < MAX_DURATION


@pytest.fixture()
def trickle(tmp_path: Path) -> Iterator[LocalServer]:
    """A media file served at 2 kB/s: a job that downloads it stays open until cancelled."""
    shutil.copyfile(UNDER_DURATION, tmp_path / "slow.wav")
    with serve_directory(tmp_path) as http:
        http.throttle(2_000)
        yield http


def test_queued_job_limits_overall_and_per_client(limited: ServerProcess,
                                                  trickle: LocalServer) -> None:
    url = trickle.url_for("slow.wav")
    a, b, c = (_limited_client(limited, t) for t in (TOKEN_A, TOKEN_B, TOKEN_C))
    opened: list[str] = []
    try:
        opened.append(a.submit_url(url).job_id)
        # Client A has its one job: a second is refused, whichever way it is submitted.
        with pytest.raises(LongscribeError) as err:
            a.submit_url(url)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _names_limit(err.value.message, "max_queued_jobs_per_client"), err.value.message
        with pytest.raises(LongscribeError) as err:
            a.upload(str(UNDER_DURATION))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _names_limit(err.value.message, "max_queued_jobs_per_client"), err.value.message
        # Another client still has room, until the server-wide limit of two is reached.
        opened.append(b.submit_url(url).job_id)
        with pytest.raises(LongscribeError) as err:
            c.submit_url(url)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_jobs=2" in err.value.message, err.value.message
        # Finished jobs free their places.
        for client, job_id in zip((a, b), opened, strict=True):
            client.cancel(job_id)
        for client, job_id in zip((a, b), opened, strict=True):
            assert _wait_state(client, job_id, TERMINAL, 30).state == pb.JOB_STATE_CANCELLED
        opened.append(c.submit_url(url).job_id)
    finally:
        owners = (a, b, c)[:len(opened)]  # jobs are only visible to the token that made them
        for client, job_id in zip(owners, opened, strict=True):
            client.cancel(job_id)
        for client, job_id in zip(owners, opened, strict=True):
            _wait_state(client, job_id, TERMINAL, 30)
        for client in (a, b, c):
            client.close()


def test_a_token_sees_and_controls_only_its_own_jobs(limited: ServerProcess,
                                                     trickle: LocalServer) -> None:
    a, b = (_limited_client(limited, t) for t in (TOKEN_A, TOKEN_B))
    channel = grpc.insecure_channel(limited.target)
    stub = pb_grpc.TranscriptionServiceStub(channel)
    job_id = a.submit_url(trickle.url_for("slow.wav")).job_id
    try:
        # Another token gets the answer an unknown id gets: nothing to probe, nothing to stop.
        for call in (lambda: b.get(job_id), lambda: b.cancel(job_id)):
            with pytest.raises(LongscribeError) as err:
                call()
            assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value.message
        with pytest.raises(grpc.RpcError) as rpc_err:
            list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=_bearer(TOKEN_B),
                               timeout=10))
        assert rpc_err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert job_id not in {j.job_id for j in b.list()}
        # The owner still sees it, unchanged by the other token's attempts.
        assert job_id in {j.job_id for j in a.list()}
        assert a.get(job_id).state not in TERMINAL
    finally:
        a.cancel(job_id)
        _wait_state(a, job_id, TERMINAL, 30)
        for client in (a, b):
            client.close()
        channel.close()


def test_deadline_on_watch_is_honoured(limited: ServerProcess, trickle: LocalServer) -> None:
    channel = grpc.insecure_channel(limited.target)
    stub = pb_grpc.TranscriptionServiceStub(channel)
    md = _bearer(TOKEN_C)
    job = stub.SubmitJob(pb.SubmitJobRequest(url=trickle.url_for("slow.wav")), metadata=md,
                         timeout=10)
    try:
        for _ in range(3):  # repeated: an abandoned watch must not pin anything on the server
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=md,
                                   timeout=1.0))
            elapsed = time.monotonic() - started
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            assert elapsed < 3.0, f"deadline of 1 s took {elapsed:.1f} s"
        # The server keeps serving, and the job was not touched by the abandoned watches.
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        state = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=md, timeout=5).state
        assert state not in TERMINAL, pb.JobState.Name(state)
    finally:
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=md, timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=md, timeout=5)
            if got.state in TERMINAL:
                break
            time.sleep(0.1)
        channel.close()
