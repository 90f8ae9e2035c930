"""The one error type the client raises: a gRPC status code and the server's message.

It covers both ways a request can fail: the RPC itself fails (grpc.RpcError), or the job runs
and ends FAILED/CANCELLED (its terminal Error event carries a numeric code)."""

from __future__ import annotations

import grpc
from longscribe.v1 import transcription_pb2 as pb

# StatusCode values are (int, name) tuples; the Error event only carries the int.
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a numeric google.rpc.Code (UNKNOWN for a number we don't know)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def tls_hint(details: str, tls: bool) -> str:
    """What a connection failure suggests about a TLS mismatch (gRPC's own text does not)."""
    if tls and ("WRONG_VERSION_NUMBER" in details or "handshake failed" in details.lower()):
        return (" (hint: the TLS handshake failed: the server may be plaintext (drop --tls), "
                "or its certificate is not signed by --tls-ca)")
    if not tls and "Socket closed" in details:
        return " (hint: the server may require TLS: add --tls, and --tls-ca for a private CA)"
    return ""


class LongscribeError(Exception):
    """An RPC error or a job that ended FAILED/CANCELLED. `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str, *, job_id: str = "",
                 job_failed: bool = False) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id
        # True: the job ran and ended FAILED/CANCELLED (the call itself went through)
        self.job_failed = job_failed

    @property
    def code_name(self) -> str:
        return self.code.name

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, *, job_id: str = "",
                 tls: bool | None = None) -> LongscribeError:
        # Every grpc.RpcError raised by a stub is also a grpc.Call with code()/details().
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        if code == grpc.StatusCode.UNAVAILABLE and tls is not None:
            details = (details or "") + tls_hint(details or "", tls)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", job_id=job_id)

    @classmethod
    def from_event(cls, error: pb.Error, *, job_id: str = "") -> LongscribeError:
        return cls(status_code(error.code), error.message, job_id=job_id, job_failed=True)

    def __repr__(self) -> str:
        return f"LongscribeError({self.code.name}, {self.message!r})"
