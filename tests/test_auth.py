"""Bearer-token authentication on a real gRPC server (health, reflection and a small test
service), over plaintext on 127.0.0.1; TLS is covered in test_tls.py."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from longscribe.service.auth import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    BearerAuthInterceptor,
    client_identity,
    load_tokens,
    peer_host,
    token_key,
)
from longscribe.service.loop_thread import LoopThread
from longscribe.service.tls import add_port

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-A"
OTHER_TOKEN = "s3cret-token-B"
WHOAMI = "/longscribe.test.Probe/WhoAmI"
COUNT = "/longscribe.test.Probe/Count"


def _probe_service(tokens: frozenset[str] | None) -> grpc.GenericRpcHandler:
    """A raw-bytes test service: WhoAmI answers client_identity(); Count (client streaming)
    answers how many messages it got."""

    async def whoami(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return client_identity(context, tokens=tokens).encode()

    async def count(requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext
                    ) -> bytes:
        return str(len([r async for r in requests])).encode()

    return grpc.method_handlers_generic_handler(
        "longscribe.test.Probe",
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
            "Count": grpc.stream_unary_rpc_method_handler(count),
        },
    )


@contextmanager
def serving(
    tokens: frozenset[str] = frozenset(),
    *,
    open_health: bool = True,
    host: str = "127.0.0.1",
    identity_tokens: frozenset[str] | None = None,
) -> Iterator[str]:
    """A real asyncio server (as `longscribe serve` runs) with the interceptor, health
    (SERVING), reflection and the probe service; yields its target."""

    async def build() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(tokens, open_health=open_health)])
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_generic_rpc_handlers((_probe_service(identity_tokens),))
        reflection.enable_server_reflection(
            (
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = add_port(server, host, 0)
        await server.start()
        return server, port

    loop = LoopThread("test-grpc")
    server, port = loop.run(build())
    try:
        yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    finally:
        loop.run(server.stop(grace=None))
        loop.close()


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


@pytest.fixture
def channel_to() -> Iterator[Callable[[str], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def open_channel(target: str) -> grpc.Channel:
        channels.append(grpc.insecure_channel(target))
        return channels[-1]

    yield open_channel
    for ch in channels:
        ch.close()


def _whoami(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    return channel.unary_unary(WHOAMI)(b"", metadata=metadata, timeout=10).decode()


def _code(exc_info: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc_info.value.code()  # type: ignore[attr-defined]


# --- the interceptor on a real server ------------------------------------------------------


def test_no_token_is_unauthenticated(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset({TOKEN})) as target, pytest.raises(grpc.RpcError) as err:
        _whoami(channel_to(target))
    assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == MISSING_TOKEN  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "header",
    [f"Bearer {OTHER_TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer x"],
)
def test_wrong_token_is_unauthenticated(
    channel_to: Callable[[str], grpc.Channel], header: str
) -> None:
    with serving(frozenset({TOKEN})) as target, pytest.raises(grpc.RpcError) as err:
        _whoami(channel_to(target), (("authorization", header),))
    assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == INVALID_TOKEN  # type: ignore[attr-defined]


@pytest.mark.parametrize("header", [TOKEN, f"Basic {TOKEN}", "Bearer ", "Bearer"])
def test_malformed_header_counts_as_missing(
    channel_to: Callable[[str], grpc.Channel], header: str
) -> None:
    with serving(frozenset({TOKEN})) as target, pytest.raises(grpc.RpcError) as err:
        _whoami(channel_to(target), (("authorization", header),))
    assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == MISSING_TOKEN  # type: ignore[attr-defined]


def test_right_token_works_and_any_configured_token(
    channel_to: Callable[[str], grpc.Channel],
) -> None:
    with serving(frozenset({TOKEN, OTHER_TOKEN})) as target:
        ch = channel_to(target)
        assert _whoami(ch, _md(TOKEN)) == token_key(TOKEN)
        assert _whoami(ch, _md(OTHER_TOKEN)) == token_key(OTHER_TOKEN)
        # the scheme is case-insensitive, as RFC 6750 allows
        assert _whoami(ch, (("authorization", f"bearer {TOKEN}"),)) == token_key(TOKEN)


def test_client_streaming_method_refused_and_allowed(
    channel_to: Callable[[str], grpc.Channel],
) -> None:
    with serving(frozenset({TOKEN})) as target:
        count = channel_to(target).stream_unary(COUNT)
        with pytest.raises(grpc.RpcError) as err:
            count(iter([b"a", b"b"]), timeout=10)
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
        assert count(iter([b"a", b"b", b"c"]), metadata=_md(TOKEN), timeout=10) == b"3"


def test_unknown_method_without_token_is_unauthenticated(
    channel_to: Callable[[str], grpc.Channel],
) -> None:
    with serving(frozenset({TOKEN})) as target:
        ch = channel_to(target)
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/longscribe.test.Probe/Nope")(b"", timeout=10)
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/longscribe.test.Probe/Nope")(b"", metadata=_md(TOKEN), timeout=10)
        assert _code(err) == grpc.StatusCode.UNIMPLEMENTED


def test_no_tokens_means_auth_off(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset()) as target:
        assert _whoami(channel_to(target)) == "peer:127.0.0.1"


def test_health_open_without_token(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset({TOKEN}), open_health=True) as target:
        stub = health_pb2_grpc.HealthStub(channel_to(target))
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_health_closed_needs_token(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset({TOKEN}), open_health=False) as target:
        stub = health_pb2_grpc.HealthStub(channel_to(target))
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Check(health_pb2.HealthCheckRequest(), metadata=_md(TOKEN), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_streaming_watch_refused_without_token(
    channel_to: Callable[[str], grpc.Channel],
) -> None:
    with serving(frozenset({TOKEN}), open_health=False) as target:
        stub = health_pb2_grpc.HealthStub(channel_to(target))
        with pytest.raises(grpc.RpcError) as err:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == MISSING_TOKEN  # type: ignore[attr-defined]
        watch = stub.Watch(health_pb2.HealthCheckRequest(), metadata=_md(TOKEN), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_reflection_open_or_closed(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset({TOKEN}), open_health=True) as target:
        services = ProtoReflectionDescriptorDatabase(channel_to(target)).get_services()
        assert "grpc.health.v1.Health" in services
    with serving(frozenset({TOKEN}), open_health=False) as target:
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(channel_to(target)).get_services()
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_never_logged(
    channel_to: Callable[[str], grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(frozenset({TOKEN})) as target, pytest.raises(grpc.RpcError):
        _whoami(channel_to(target), _md(OTHER_TOKEN))
    assert "refused" in caplog.text  # the refusal itself is logged...
    assert TOKEN not in caplog.text and OTHER_TOKEN not in caplog.text  # ...never a token


# --- client_identity through real calls -------------------------------------------------


def test_identity_token_vs_ipv4_peer(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset({TOKEN})) as target:
        assert _whoami(channel_to(target), _md(TOKEN)) == token_key(TOKEN)
    with serving(frozenset()) as target:
        ch = channel_to(target)
        assert _whoami(ch) == "peer:127.0.0.1"
        # auth off: by default any bearer token names the client...
        assert _whoami(ch, _md("made-up")) == token_key("made-up")
    with serving(frozenset(), identity_tokens=frozenset()) as target:
        # ...unless the server passes its (empty) token set, so invented tokens do not count
        assert _whoami(channel_to(target), _md("made-up")) == "peer:127.0.0.1"


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_identity_ipv6_peer(channel_to: Callable[[str], grpc.Channel]) -> None:
    with serving(frozenset(), host="::1") as target:
        assert _whoami(channel_to(target)) == "peer:::1"


def test_token_key_is_stable_short_and_not_the_token() -> None:
    assert token_key(TOKEN) == token_key(TOKEN)
    assert token_key(TOKEN) != token_key(OTHER_TOKEN)
    assert token_key(TOKEN).startswith("token:") and len(token_key(TOKEN)) == len("token:") + 16
    assert TOKEN not in token_key(TOKEN)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.1.2.3:5678", "10.1.2.3"),
        ("ipv6:[::1]:5678", "::1"),
        ("ipv6:%5B::1%5D:5678", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("ipv6:[::ffff:192.0.2.1]:80", "192.0.2.1"),
        ("unix:/run/longscribe.sock", "unix:/run/longscribe.sock"),
        ("", "unknown"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# --- load_tokens ----------------------------------------------------------------------


def test_load_tokens_file_and_csv(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# team tokens\n\n  alpha  \n#beta-disabled\nbeta\r\nalpha\n")
    assert load_tokens("gamma, delta,,", str(f)) == {"alpha", "beta", "gamma", "delta"}
    assert load_tokens("", "") == frozenset()
    assert load_tokens(" , ", "") == frozenset()


def test_load_tokens_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="cannot read auth tokens file.*nope"):
        load_tokens("", str(missing))
    with pytest.raises(ValueError, match="cannot read auth tokens file"):
        load_tokens("", str(tmp_path))  # a directory


def test_load_tokens_rejects_empty_file_and_bad_tokens(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no tokens"):
        load_tokens("", str(empty))
    bad = tmp_path / "bad"
    bad.write_text("good\nsecret with-space\n")
    with pytest.raises(ValueError, match=r"bad:2") as err:
        load_tokens("", str(bad))
    assert "secret" not in str(err.value).replace(str(tmp_path), "")
    with pytest.raises(ValueError, match="position 2"):
        load_tokens("ok,caf\u00e9", "")
