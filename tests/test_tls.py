"""TLS and mutual TLS on a real gRPC server with a trustme test PKI, from Python clients and from
the real grpcurl binary; plus the start-up checks of service/tls.py."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from longscribe.service.auth import BearerAuthInterceptor
from longscribe.service.loop_thread import LoopThread
from longscribe.service.tls import NO_PORT_SHARING, add_port, server_credentials

from tests.conftest import ServerProcess
from tests.grpcurl import grpcurl_path, run_grpcurl
from tests.pki import TestPki, make_pki

pytestmark = pytest.mark.timeout(60)

TOKEN = "tls-test-token"
HEALTH_CHECK = "grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_server(
    pki: TestPki,
    *,
    mtls: bool = False,
    tokens: frozenset[str] = frozenset(),
    open_health: bool = True,
) -> Iterator[int]:
    """A real asyncio TLS server (health SERVING + reflection) on 127.0.0.1, as
    `longscribe serve` runs; yields its port."""

    async def build() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(tokens, open_health=open_health)])
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(
            (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
        port = add_port(
            server,
            "127.0.0.1",
            0,
            cert=str(pki.server_cert),
            key=str(pki.server_key),
            client_ca=str(pki.ca_cert) if mtls else "",
        )
        await server.start()
        return server, port

    loop = LoopThread("test-grpc")
    server, port = loop.run(build())
    try:
        yield port
    finally:
        loop.run(server.stop(grace=None))
        loop.close()


def _check(target: str, creds: grpc.ChannelCredentials, timeout: float = 10) -> int:
    """Health/Check over a secure channel; returns the serving status."""
    with grpc.secure_channel(target, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _refused_code(target: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _check(target, creds, timeout=5)
    return err.value.code()  # type: ignore[attr-defined]


# --- Python clients ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_client_with_test_ca_works(pki: TestPki, host: str) -> None:
    with tls_server(pki) as port:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem())
        assert _check(f"{host}:{port}", creds) == health_pb2.HealthCheckResponse.SERVING


def test_tls_client_without_the_ca_fails(pki: TestPki) -> None:
    with tls_server(pki) as port:
        target = f"127.0.0.1:{port}"
        # system roots only, then an unrelated CA: neither vouches for the test server
        assert _refused_code(target, grpc.ssl_channel_credentials()) == (
            grpc.StatusCode.UNAVAILABLE
        )
        other = grpc.ssl_channel_credentials(root_certificates=pki.other_ca_pem())
        assert _refused_code(target, other) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_tls_server(pki: TestPki) -> None:
    with tls_server(pki) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mtls_needs_a_client_certificate(pki: TestPki) -> None:
    with tls_server(pki, mtls=True) as port:
        target = f"127.0.0.1:{port}"
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem())
        assert _refused_code(target, no_cert) == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem(),
            private_key=pki.client_key_pem(),
            certificate_chain=pki.client_cert_pem(),
        )
        assert _check(target, with_cert) == health_pb2.HealthCheckResponse.SERVING


def test_mtls_refuses_a_client_certificate_from_another_ca(pki: TestPki, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "stranger")
    with tls_server(pki, mtls=True) as port:
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem(),
            private_key=stranger.client_key_pem(),
            certificate_chain=stranger.client_cert_pem(),
        )
        assert _refused_code(f"127.0.0.1:{port}", creds) == grpc.StatusCode.UNAVAILABLE


def test_tls_and_token_together(pki: TestPki) -> None:
    with tls_server(pki, tokens=frozenset({TOKEN}), open_health=False) as port:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem())
        call = grpc.access_token_call_credentials(TOKEN)  # sends "authorization: Bearer ..."
        both = grpc.composite_channel_credentials(creds, call)
        assert _check(f"127.0.0.1:{port}", both) == health_pb2.HealthCheckResponse.SERVING
        assert _refused_code(f"127.0.0.1:{port}", creds) == grpc.StatusCode.UNAUTHENTICATED


# --- grpcurl ------------------------------------------------------------------------


def test_grpcurl_is_found_offline() -> None:
    path = grpcurl_path()
    proc = run_grpcurl("-version")
    assert proc.returncode == 0, proc.stderr
    assert "grpcurl" in (proc.stdout + proc.stderr), path


def test_grpcurl_over_tls_with_test_ca(pki: TestPki) -> None:
    with tls_server(pki) as port:
        address = f"127.0.0.1:{port}"
        check = run_grpcurl("-cacert", str(pki.ca_cert), address, HEALTH_CHECK)
        assert check.returncode == 0, check.stderr
        assert '"status": "SERVING"' in check.stdout
        listed = run_grpcurl("-cacert", str(pki.ca_cert), address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "grpc.health.v1.Health" in listed.stdout.split()
        # without the test CA grpcurl must not trust the server
        untrusted = run_grpcurl(address, HEALTH_CHECK)
        assert untrusted.returncode != 0
        assert "certificate" in untrusted.stderr.lower(), untrusted.stderr


def test_grpcurl_list_and_check_with_tokens(pki: TestPki) -> None:
    ca = ("-cacert", str(pki.ca_cert))
    bearer = ("-H", f"authorization: Bearer {TOKEN}")
    with tls_server(pki, tokens=frozenset({TOKEN}), open_health=True) as port:
        address = f"127.0.0.1:{port}"
        listed = run_grpcurl(*ca, address, "list")  # reflection open: no token needed
        assert listed.returncode == 0, listed.stderr
        assert "grpc.health.v1.Health" in listed.stdout.split()
        check = run_grpcurl(*ca, address, HEALTH_CHECK)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stderr
    with tls_server(pki, tokens=frozenset({TOKEN}), open_health=False) as port:
        address = f"127.0.0.1:{port}"
        refused = run_grpcurl(*ca, address, "list")
        assert refused.returncode != 0
        assert "Unauthenticated" in refused.stderr, refused.stderr
        refused = run_grpcurl(*ca, address, HEALTH_CHECK)
        assert refused.returncode != 0 and "missing bearer token" in refused.stderr
        wrong = run_grpcurl(*ca, "-H", "authorization: Bearer nope", address, HEALTH_CHECK)
        assert wrong.returncode != 0 and "invalid bearer token" in wrong.stderr
        listed = run_grpcurl(*ca, *bearer, address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "grpc.health.v1.Health" in listed.stdout.split()
        check = run_grpcurl(*ca, *bearer, address, HEALTH_CHECK)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stderr


def test_grpcurl_mtls(pki: TestPki) -> None:
    with tls_server(pki, mtls=True) as port:
        address = f"127.0.0.1:{port}"
        # the server drops the handshake; grpcurl keeps redialling until its connect timeout
        no_cert = run_grpcurl(
            "-connect-timeout", "3", "-cacert", str(pki.ca_cert), address, HEALTH_CHECK
        )
        assert no_cert.returncode != 0
        assert "Failed to dial" in no_cert.stderr, no_cert.stderr
        ok = run_grpcurl(
            "-cacert",
            str(pki.ca_cert),
            "-cert",
            str(pki.client_cert),
            "-key",
            str(pki.client_key),
            address,
            HEALTH_CHECK,
        )
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr


# --- start-up checks -------------------------------------------------------------------


def test_server_credentials_accepts_good_files(pki: TestPki) -> None:
    assert isinstance(
        server_credentials(str(pki.server_cert), str(pki.server_key)), grpc.ServerCredentials
    )
    assert isinstance(
        server_credentials(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert)),
        grpc.ServerCredentials,
    )


def test_server_credentials_clear_errors(pki: TestPki, tmp_path: Path) -> None:
    cert, key = str(pki.server_cert), str(pki.server_key)
    with pytest.raises(ValueError, match=r"cannot read TLS certificate .*missing\.pem"):
        server_credentials(str(tmp_path / "missing.pem"), key)
    with pytest.raises(ValueError, match=r"cannot read TLS key"):
        server_credentials(cert, str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match=r"does not match the certificate"):
        server_credentials(cert, str(pki.client_key))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"holds no PEM certificate"):
        server_credentials(str(junk), key)
    with pytest.raises(ValueError, match=r"is not a PEM private key"):
        server_credentials(cert, str(junk))
    with pytest.raises(ValueError, match=r"client CA .*holds no PEM certificate"):
        server_credentials(cert, key, str(junk))
    with pytest.raises(ValueError, match=r"cannot read TLS client CA"):
        server_credentials(cert, key, str(tmp_path / "no-ca.pem"))
    # the key and the certificate swapped, as a tired operator might
    with pytest.raises(ValueError):
        server_credentials(key, cert)


def test_server_credentials_encrypted_key(pki: TestPki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ValueError, match="is encrypted"):
        server_credentials(str(pki.server_cert), str(encrypted))


def test_add_port_refuses_half_a_tls_configuration(pki: TestPki) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(ValueError, match="both a certificate and a key"):
            add_port(server, "127.0.0.1", 0, cert=str(pki.server_cert))
        with pytest.raises(ValueError, match="both a certificate and a key"):
            add_port(server, "127.0.0.1", 0, key=str(pki.server_key))
        with pytest.raises(ValueError, match="needs TLS on"):
            add_port(server, "127.0.0.1", 0, client_ca=str(pki.ca_cert))
    finally:
        server.stop(grace=None)


def test_add_port_reports_a_port_in_use() -> None:
    options = [NO_PORT_SHARING]
    first = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=options)
    second = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=options)
    try:
        port = add_port(first, "127.0.0.1", 0)
        first.start()
        assert port > 0
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            add_port(second, "127.0.0.1", port)
    finally:
        first.stop(grace=None)
        second.stop(grace=None)


def test_tls_mismatch_errors_carry_a_hint(pki: TestPki, server: ServerProcess) -> None:
    """A plaintext client at a TLS server, and a TLS client at a plaintext one: UNAVAILABLE
    either way, and the message says what to change."""
    from longscribe.client.client import LongscribeClient
    from longscribe.client.errors import LongscribeError

    with (tls_server(pki) as port,
          LongscribeClient(f"127.0.0.1:{port}", timeout=5) as client,
          pytest.raises(LongscribeError) as plain):
        list(client.list())
    assert plain.value.code == grpc.StatusCode.UNAVAILABLE
    assert "the server may require TLS: add --tls" in plain.value.message
    with (LongscribeClient(server.target, tls_ca=str(pki.ca_cert), timeout=5) as client,
          pytest.raises(LongscribeError) as secure):
        list(client.list())
    assert secure.value.code == grpc.StatusCode.UNAVAILABLE
    assert "the server may be plaintext (drop --tls)" in secure.value.message
