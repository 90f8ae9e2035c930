"""Shared test fixtures: the test data, WER scoring, ffmpeg helpers, and a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(
    os.environ.get("LONGSCRIBE_TESTDATA", ROOT.parent / "shared" / "testdata")
).resolve()
JFK = TESTDATA / "jfk.flac"
LJ = TESTDATA / "ljspeech_LJ001-0001_to_0032.flac"


def require_testdata() -> None:
    if not JFK.is_file():
        pytest.fail(f"test data not found at {TESTDATA} (set LONGSCRIBE_TESTDATA)")


def jfk_text() -> str:
    return (TESTDATA / "jfk.txt").read_text().strip()


def lj_text() -> str:
    return (TESTDATA / "ljspeech_LJ001-0001_to_0032.txt").read_text().strip()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after whisper's English normaliser on both sides."""
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    return jiwer.wer(normalize(reference), normalize(hypothesis))


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; raise with its stderr on failure."""
    proc = subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {proc.stderr}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m longscribe.service.server` as a child process on 127.0.0.1."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port),
                     "--data-dir", str(data_dir), *extra]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 120.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "longscribe.service.server", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 120.0, credentials: grpc.ChannelCredentials | None
                     = None) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            channel = (grpc.secure_channel(self.target, credentials) if credentials
                       else grpc.insecure_channel(self.target))
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            finally:
                channel.close()
            time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media-root")
    require_testdata()
    (root / "jfk.flac").write_bytes(JFK.read_bytes())
    return root


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, media_root: Path) -> Iterator[ServerProcess]:
    """One real server for the session: offline tiny.en on CPU, media from 127.0.0.1 allowed."""
    require_testdata()
    proc = ServerProcess(
        tmp_path_factory.mktemp("server") / "data",
        "--media-root", str(media_root), "--allow-private-networks", "--workers", "3",
    ).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"server did not stop cleanly ({code}):\n{proc.log()[-3000:]}"


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[object]:
    from longscribe.client.client import LongscribeClient

    with LongscribeClient(server.target, timeout=60) as c:
        yield c
