"""URL safety rules: schemes, address classes, resolver override, allowlist."""

from __future__ import annotations

import ipaddress

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from longscribe.service import netguard
from longscribe.service.errors import JobError


def _code(url: str, allow: bool = False, **kw: object) -> grpc.StatusCode | None:
    try:
        netguard.check_url(url, allow, **kw)
    except JobError as e:
        return e.code
    return None


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://ftp.example.com/a.mp3",
        "data:audio/mpeg;base64,AAAA",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "//example.com/a.mp3",
        "example.com/a.mp3",
        "http:///nohost",
        "http://example.com:99999/",
    ],
)
def test_non_http_or_malformed_urls_are_invalid(url: str) -> None:
    assert _code(url) == grpc.StatusCode.INVALID_ARGUMENT
    # allowing private networks does not open other schemes
    assert _code(url, allow=True) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "url, named",
    [
        ("http://127.0.0.1:8080/a.mp3", "127.0.0.1"),
        ("http://localhost/a.mp3", "localhost"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::1]/", "::1"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:"),
        ("http://0.0.0.0/", "0.0.0.0"),
        ("http://10.1.2.3/", "10.1.2.3"),
        ("http://192.168.0.10/", "192.168.0.10"),
        ("http://100.64.0.1/", "100.64.0.1"),
        ("https://224.0.0.251/", "224.0.0.251"),
    ],
)
def test_private_targets_are_refused_and_named(url: str, named: str) -> None:
    with pytest.raises(JobError) as info:
        netguard.check_url(url, False)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert named in info.value.message
    assert "--allow-private-networks" in info.value.message
    assert _code(url, allow=True) is None


def test_metadata_address_is_called_out() -> None:
    reason = netguard.blocked_reason(ipaddress.ip_address("169.254.169.254"))
    assert reason is not None and "metadata" in reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "1.1.1.1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert netguard.blocked_reason(ipaddress.ip_address(address)) is None


def test_public_looking_name_resolving_private_is_refused() -> None:
    with (
        netguard.override_resolver({"media.example.com": ["10.0.0.5"]}),
        pytest.raises(JobError) as info,
    ):
        netguard.check_url("https://media.example.com/talk.mp3", False)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "10.0.0.5" in info.value.message and "media.example.com" in info.value.message


def test_every_address_must_pass() -> None:
    # one public and one private answer: the connection could land on either
    with netguard.override_resolver({"mixed.example.com": ["93.184.216.34", "192.168.1.1"]}):
        assert _code("http://mixed.example.com/") == grpc.StatusCode.PERMISSION_DENIED
    with netguard.override_resolver({"public.example.com": ["93.184.216.34", "1.1.1.1"]}):
        assert _code("http://public.example.com/") is None


def test_override_is_scoped() -> None:
    with netguard.override_resolver({"scoped.invalid": ["93.184.216.34"]}):
        assert netguard.resolve("scoped.invalid", 80) == ["93.184.216.34"]
    assert _code("http://scoped.invalid/") == grpc.StatusCode.INVALID_ARGUMENT  # unresolvable


def test_allow_endpoints_permits_exactly_that_port() -> None:
    allowed = {("127.0.0.1", 8080)}
    assert _code("http://127.0.0.1:8080/x", allow_endpoints=allowed) is None
    assert _code("http://127.0.0.1:8081/x", allow_endpoints=allowed) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


@given(st.ip_addresses())
@settings(max_examples=500, deadline=None)
def test_any_ip_literal_is_allowed_exactly_when_public(address: ipaddress._BaseAddress) -> None:
    host = f"[{address}]" if address.version == 6 else str(address)
    code = _code(f"http://{host}:8080/a.mp3")
    public = netguard.blocked_reason(address) is None
    assert code == (None if public else grpc.StatusCode.PERMISSION_DENIED)
    if public:  # never lets through anything Python itself knows to be non-public
        assert address.is_global and not address.is_multicast
    assert _code(f"http://{host}:8080/a.mp3", allow=True) is None
