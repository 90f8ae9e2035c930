"""TLS for the gRPC server: credentials from PEM files, checked at start-up, and a helper that
binds a secure or an insecure port.

Wiring (server.py):

    server = grpc.server(executor, interceptors=..., options=[NO_PORT_SHARING, ...])
    port = add_port(server, cfg.host, cfg.port,
                    cert=cfg.tls_cert, key=cfg.tls_key, client_ca=cfg.tls_client_ca)

gRPC itself reports a bad certificate or key only as a handshake failure on the first call; the
checks here turn that into a ValueError naming the file before the server starts.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

# gRPC sets SO_REUSEPORT by default, so a second server on a busy port binds "successfully" and
# the kernel splits connections between the two. With this server option add_port fails instead.
NO_PORT_SHARING: tuple[str, int] = ("grpc.so_reuseport", 0)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS {what} {path!r}: {exc.strerror or exc}") from None


def _load_certs(data: bytes, path: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"TLS {what} {path!r} holds no PEM certificate")
    return certs


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(cert: x509.Certificate, key_pem: bytes, key_path: str) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(
            f"TLS key {key_path!r} is encrypted; give an unencrypted PEM key"
        ) from None
    except ValueError:
        raise ValueError(f"TLS key {key_path!r} is not a PEM private key") from None
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ValueError(
            f"TLS key {key_path!r} does not match the certificate "
            f"(subject {cert.subject.rfc4514_string()!r})"
        )


def _warn_if_expired(cert: x509.Certificate, cert_path: str) -> None:
    # A warning, not an error: clients decide what they accept, and some test rigs want it.
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        log.warning(
            "TLS certificate %s is not valid now (valid %s to %s)",
            cert_path,
            cert.not_valid_before_utc.isoformat(),
            cert.not_valid_after_utc.isoformat(),
        )


def server_credentials(
    cert_path: str, key_path: str, client_ca_path: str = ""
) -> grpc.ServerCredentials:
    """Server TLS credentials from a PEM certificate chain (leaf first) and its private key.
    With `client_ca_path`, clients must present a certificate signed by that CA (mTLS).

    Raises ValueError for unreadable files, non-PEM content, an encrypted key, or a key that
    does not belong to the certificate."""
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    leaf = _load_certs(cert_pem, cert_path, "certificate")[0]
    _check_key_matches(leaf, key_pem, key_path)
    _warn_if_expired(leaf, cert_path)
    client_ca: bytes | None = None
    if client_ca_path:
        client_ca = _read(client_ca_path, "client CA")
        _load_certs(client_ca, client_ca_path, "client CA")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _address(host: str, port: int) -> str:
    # A bare IPv6 literal needs brackets in a gRPC target ("[::]:50051").
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def add_port(
    server: grpc.Server | grpc.aio.Server,
    host: str,
    port: int,
    *,
    cert: str = "",
    key: str = "",
    client_ca: str = "",
) -> int:
    """Bind `host:port` (port 0: a free one) on `server`, with TLS when `cert` and `key` are
    given, and return the bound port. Raises ValueError for half a TLS configuration or bad
    files, OSError when the address cannot be bound (a port in use only with NO_PORT_SHARING
    among the server's options)."""
    if bool(cert) != bool(key):
        raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    if client_ca and not cert:
        raise ValueError("client-certificate verification (--tls-client-ca) needs TLS on")
    address = _address(host, port)
    try:
        if cert:
            bound = server.add_secure_port(address, server_credentials(cert, key, client_ca))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot listen on {address} (in use, or not a local address?)")
    log.info("listening on %s:%d (%s)", host, bound, "TLS" if cert else "plaintext")
    return bound
