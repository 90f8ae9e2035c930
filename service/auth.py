"""Bearer-token authentication for the gRPC server, and a stable per-client key.

Wiring (server.py):

    tokens = load_tokens(cfg.auth_tokens, cfg.auth_tokens_file)      # ValueError at start-up
    interceptors = [BearerAuthInterceptor(tokens, open_health=cfg.auth_open_health)]
    server = grpc.aio.server(interceptors=interceptors)
    ...
    key = client_identity(context, tokens=tokens)   # per-client limits

Tokens are secrets: nothing here logs them or puts them in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

log = logging.getLogger(__name__)

MISSING_TOKEN = "missing bearer token: send 'authorization: Bearer <token>' metadata"
INVALID_TOKEN = "invalid bearer token"

# Method prefixes that stay reachable without a token when open_health=True: load balancers
# probe health, and `grpcurl list` / `describe` need reflection before a user has a token.
OPEN_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _check_token(token: str, where: str) -> str:
    # Metadata values are printable ASCII without spaces after the scheme; a token that breaks
    # that rule could never be sent, so refuse it at start-up instead of failing every call.
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"bearer token at {where} must be printable ASCII without spaces or tabs")
    return token


def load_tokens(tokens_csv: str = "", tokens_file: str = "") -> frozenset[str]:
    """Union of the comma-separated tokens and the tokens file (one per line; full-line '#'
    comments and blank lines ignored). Empty result: authentication is off.

    Raises ValueError (never echoing a token) for an unreadable file or a malformed token."""
    tokens: set[str] = set()
    for i, part in enumerate(tokens_csv.split(",") if tokens_csv else [], start=1):
        part = part.strip()
        if part:
            tokens.add(_check_token(part, f"position {i} of the token list"))
    if tokens_file:
        try:
            text = Path(tokens_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"cannot read auth tokens file {tokens_file!r}: {exc.__class__.__name__}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.add(_check_token(line, f"{tokens_file}:{lineno}"))
        if not tokens:
            # A file given but empty would silently turn auth off; say so loudly instead.
            raise ValueError(f"auth tokens file {tokens_file!r} holds no tokens")
    if tokens:
        log.info("bearer-token authentication on (%d token(s))", len(tokens))
    return frozenset(tokens)


def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token from the first `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def _token_matches(token: str, tokens: frozenset[str]) -> bool:
    # compare_digest against every configured token (no early exit), so timing tells nothing
    # about which token or how many characters matched.
    given = token.encode("utf-8")
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given, t.encode("utf-8"))
    return ok


def _aborting_handler(like: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same call kind as `like` that answers UNAUTHENTICATED. It has no
    request deserializer, so an unauthenticated request is never parsed. A unary request runs
    it only once its message is received: one over the receive limit is answered
    RESOURCE_EXHAUSTED by gRPC first (documented in the README)."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if like is None:
        # Unknown method: a stream-request handler runs at once, without waiting for a
        # message, whatever kind of call the client made; and it does not reveal which
        # methods exist.
        return grpc.stream_stream_rpc_method_handler(abort)
    factory: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(like.request_streaming), bool(like.response_streaming))]
    return factory(abort)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method when `tokens` is non-empty;
    health and reflection stay open when `open_health`. With no tokens it lets everything by."""

    def __init__(self, tokens: Iterable[str], open_health: bool = True) -> None:
        self._tokens = frozenset(tokens)
        self._open_prefixes = OPEN_PREFIXES if open_health else ()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not self._tokens:
            return await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if method.startswith(self._open_prefixes):
            return await continuation(handler_call_details)
        token = _bearer_token(handler_call_details.invocation_metadata)
        if token is not None and _token_matches(token, self._tokens):
            return await continuation(handler_call_details)
        message = MISSING_TOKEN if token is None else INVALID_TOKEN
        log.info("refused %s: %s", method, message)
        return _aborting_handler(await continuation(handler_call_details), message)


def token_key(token: str) -> str:
    """A short, stable, non-reversible name for a token (for limits, logs and metrics)."""
    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: 'ipv4:1.2.3.4:5678' → '1.2.3.4',
    'ipv6:[::1]:5678' (also percent-encoded) → '::1', 'unix:/path' → 'unix:/path'."""
    peer = unquote(peer or "")
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif scheme == "ipv6":
        host = rest.rsplit("]", 1)[0].lstrip("[") if rest.startswith("[") else rest
    else:
        return peer or "unknown"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d: one client, one key.
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def client_identity(context: grpc.aio.ServicerContext, *,
                    tokens: frozenset[str] | None = None) -> str:
    """A stable per-client key for per-client limits: 'token:<sha256 prefix>' when the call
    carries a bearer token, else 'peer:<ip>'.

    Pass `tokens` (the configured set, possibly empty) so that only a configured token counts:
    with auth off, a client could otherwise escape a per-client limit by inventing tokens."""
    token = _bearer_token(context.invocation_metadata())
    if token is not None and (tokens is None or _token_matches(token, tokens)):
        return token_key(token)
    return "peer:" + peer_host(context.peer())
