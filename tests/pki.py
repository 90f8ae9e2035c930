"""A throw-away test PKI made with trustme: a CA, a server certificate for 127.0.0.1, ::1 and
localhost, and a client certificate, written as PEM files into a directory.

    from tests.pki import make_pki
    pki = make_pki(tmp_path)
    server: add_port(server, "127.0.0.1", 0, cert=str(pki.server_cert), key=str(pki.server_key))
    client: grpc.ssl_channel_credentials(root_certificates=pki.ca_pem())
    grpcurl: run_grpcurl("-cacert", str(pki.ca_cert), f"127.0.0.1:{port}", "list")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAMES = ("127.0.0.1", "::1", "localhost")
CLIENT_NAME = "client@longscribe.test"


@dataclass(frozen=True)
class TestPki:
    """Paths of the PEM files; the *_pem() methods read them back as bytes for grpc."""

    __test__ = False  # not a pytest test class despite the name

    directory: Path
    ca_cert: Path
    server_cert: Path  # leaf certificate (trustme's CA is a root, so no intermediates)
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a second, unrelated CA: trusting it must not be enough

    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    def client_cert_pem(self) -> bytes:
        return self.client_cert.read_bytes()

    def client_key_pem(self) -> bytes:
        return self.client_key.read_bytes()

    def other_ca_pem(self) -> bytes:
        return self.other_ca_cert.read_bytes()


def make_pki(directory: Path | str) -> TestPki:
    """Create the CA and certificates under `directory` (created if missing)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="longscribe test CA")
    server = ca.issue_cert(*SERVER_NAMES)
    client = ca.issue_cert(CLIENT_NAME, common_name="longscribe test client")
    other = trustme.CA(organization_name="unrelated test CA")

    pki = TestPki(
        directory=d,
        ca_cert=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca_cert=d / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(pki.ca_cert))
    server.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.cert_chain_pems[0].write_to_path(str(pki.client_cert))
    client.private_key_pem.write_to_path(str(pki.client_key))
    other.cert_pem.write_to_path(str(pki.other_ca_cert))
    return pki
