"""Retry policy: tenacity retries `Transient` failures only (connection errors, timeouts, HTTP
408/425/429/5xx), with bounded attempts, total time and exponential backoff; a backoff wait ends
at once when the download is stopped. Sources keep their own retries off."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import tenacity
from longscribe.service.errors import Cancelled, JobError

log = logging.getLogger("longscribe.fetch")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds for retrying transient failures; tests shrink the waits."""

    max_total_seconds: float = 120.0
    initial_wait: float = 1.0
    max_wait: float = 15.0


class Transient(JobError):
    """A failure worth retrying (network trouble, HTTP 5xx/429)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


def with_retries(try_once: Callable[[], T], *, url: str, retries: int, policy: RetryPolicy,
                 stop: threading.Event) -> T:
    """`try_once()`, again after each Transient failure: at most `retries` + 1 attempts within
    `policy.max_total_seconds`. The last Transient becomes UNAVAILABLE naming the attempts."""

    def pause(seconds: float) -> None:
        if stop.wait(seconds):
            raise Cancelled("the download was cancelled")

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1)
        | tenacity.stop_after_delay(policy.max_total_seconds),
        wait=tenacity.wait_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
        retry=tenacity.retry_if_exception_type(Transient),
        sleep=pause,
        before_sleep=lambda state: log.info(
            "retrying %s after attempt %d: %s", url, state.attempt_number, state.outcome.exception()
        ),
        reraise=True,
    )
    try:
        return retrying(try_once)
    except Transient as e:
        tried = retrying.statistics.get("attempt_number", 1)
        raise JobError(
            grpc.StatusCode.UNAVAILABLE, f"{e.message} (gave up after {tried} attempts)"
        ) from None
