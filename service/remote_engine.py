"""The `remote` engine: windows transcribed by a server speaking the OpenAI audio API.

Each window (≤ 30 s, cut at silence) goes as a 16 kHz mono WAV in one multipart POST to
`{URL}/audio/transcriptions` (`/audio/translations` for task translate) with the model,
language, prompt and `response_format=verbose_json`; the answer's segments (and words, when
the remote gives them) are shifted to absolute times. Every job's windows share N worker
threads (`--remote-concurrency`: the limit is the remote's, not a job's), a token bucket
(`--remote-rpm`), a circuit breaker, and retries by class (tenacity):

- 429: wait the `Retry-After` (the whole bucket pauses: the limit is the key's), else back off;
- 5xx, timeouts, refused or broken connections: exponential backoff with jitter; they count
  for the circuit breaker, which opens after `--remote-failure-threshold` in a row; while it is
  open jobs wait (their progress message says so), one half-open probe at a time tests the
  remote, and past `--remote-down-timeout` of failures the waiting jobs fail UNAVAILABLE;
- other 4xx: the job fails at once (401 UNAUTHENTICATED, 403 PERMISSION_DENIED, the rest
  INVALID_ARGUMENT), with the remote's own message.

Degradation: when windows wait longer than `--remote-degrade-after` s for a request slot, the
engine steps down one level at a time (1: no temperature fallback, 2: no word timestamps) and
back up once they wait less than half that again; audio is never dropped. Results come back in
window order; the pipeline stores each window, so a restarted job sends none of them again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from . import metrics
from .circuit import CLOSED, STATES, CircuitBreaker
from .errors import Cancelled, JobError
from .remote_http import (
    Aborted,
    Call,
    RateLimited,
    Rejected,
    RemoteClient,
    RemoteRequest,
    Transient,
    display_url,
    wav_bytes,
)
from .transcriber import SAMPLE_RATE, DecodeOptions, SegmentResult, WindowResult, WordResult

log = logging.getLogger(__name__)

LEVELS = ("full", "no temperature fallback", "no word timestamps")
NOTIFY_EVERY = 1.0  # seconds between repeated progress messages (circuit waits) per job
TICK = 0.5  # seconds: idle workers look at the degradation level this often


@dataclass(frozen=True)
class RemoteSettings:
    url: str
    model: str
    api_key: str = ""
    concurrency: int = 4
    rpm: float = 0.0
    timeout: float = 120.0
    down_timeout: float = 300.0
    failure_threshold: int = 5
    degrade_after: float = 30.0
    model_field: str = "model"

    @classmethod
    def from_config(cls, config: Any) -> RemoteSettings:
        """Checked settings; raises ValueError naming the flag that is wrong."""
        url = (config.remote_url or "").strip()
        if not url.startswith(("http://", "https://")):
            raise ValueError("--engine remote needs --remote-url http(s)://HOST[:PORT]/PATH "
                             "(the API's base URL, e.g. https://api.openai.com/v1)")
        if not config.remote_model:
            raise ValueError("--engine remote needs --remote-model (the remote's model name)")
        key = config.remote_api_key
        if config.remote_api_key_file:
            try:
                key = Path(config.remote_api_key_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ValueError(f"--remote-api-key-file: cannot read it ({exc.strerror})"
                                 ) from exc
        if config.remote_concurrency < 1:
            raise ValueError("--remote-concurrency must be 1 or more")
        return cls(url=url, model=config.remote_model, api_key=key,
                   concurrency=config.remote_concurrency, rpm=config.remote_rpm,
                   timeout=config.remote_timeout, down_timeout=config.remote_down_timeout,
                   failure_threshold=config.remote_failure_threshold,
                   degrade_after=config.remote_degrade_after,
                   model_field=config.remote_model_field or "model")


class Degradation:
    """The step the engine runs at, from how long windows wait for a request slot, at most one
    step per `after` seconds: down when a window waited longer than `after` since the last step;
    up when the latest window waited less than `after / 2`, or none was waiting (caught up)."""

    def __init__(self, after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after
        self.clock = clock
        self.level = 0
        self._last_step = clock() - after
        self._max_wait = 0.0  # longest wait seen since the last step

    def observe(self, wait: float, idle: bool = False) -> int:
        """A window was sent after waiting `wait` s (or, `idle`, a slot found none waiting);
        returns the step taken: +1 (down), -1 (up) or 0."""
        if self.after <= 0:
            return 0
        now = self.clock()
        self._max_wait = max(self._max_wait, wait)
        if now - self._last_step < self.after:
            return 0
        if self._max_wait > self.after and self.level < len(LEVELS) - 1:
            return self._step(+1, now)
        if self.level > 0 and (idle or wait < self.after / 2):
            return self._step(-1, now)
        return 0

    def _step(self, step: int, now: float) -> int:
        self.level += step
        self._last_step, self._max_wait = now, 0.0
        return step


@dataclass(eq=False)
class _Job:
    options: DecodeOptions
    cancel: threading.Event
    progress: Callable[..., None] | None
    priority: int
    max_pending: int
    order: deque[_Task] = field(default_factory=deque)
    feed_done: bool = False
    closed: bool = False
    error: JobError | None = None
    reached: float = 0.0  # end of the last window handed back
    notified_at: float = 0.0

    @property
    def dead(self) -> bool:
        return self.closed or self.cancel.is_set() or self.error is not None


@dataclass(eq=False)
class _Task:
    job: _Job
    window: Any
    enqueued: float
    result: WindowResult | None = None
    done: bool = False
    call: Call | None = None


class RemoteEngine:
    """A `Transcriber` over the OpenAI audio API; see the module docstring."""

    name = "remote"

    def __init__(self, settings: RemoteSettings, *, clock: Callable[[], float] = time.monotonic,
                 client: RemoteClient | None = None) -> None:
        from .ratelimit import TokenBucket

        self.settings = settings
        self.url = display_url(settings.url)
        self.clock = clock
        self.client = client or RemoteClient(settings.url, settings.model, settings.api_key,
                                             timeout=settings.timeout,
                                             model_field=settings.model_field)
        # whisper's English-only models end in .en; anything else may be asked for any language
        self.is_multilingual = not Path(settings.model.rstrip("/")).name.endswith(".en")
        self.backend = self  # the server logs engine.backend.describe()
        self.metrics = metrics.default()
        burst = max(1, min(settings.concurrency, int(settings.rpm // 10)))
        self.bucket = TokenBucket(settings.rpm, burst=burst, clock=clock)
        self.circuit = CircuitBreaker(settings.failure_threshold, clock=clock,
                                      on_change=self._circuit_changed)
        self.degradation = Degradation(settings.degrade_after, clock=clock)
        self._cv = threading.Condition()
        self._queue: list[tuple[int, int, _Task]] = []  # (-priority, arrival, task)
        self._arrival = itertools.count()
        self._jobs: list[_Job] = []
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self._in_flight: set[_Task] = set()
        self._announcements: list[tuple[list[_Job], str]] = []  # degradation steps to tell
        for name in STATES:
            self.metrics.remote_circuit_state.labels(state=name).set(1 if name == CLOSED else 0)
        self.metrics.remote_degradation_level.set(0)

    def describe(self) -> str:
        limit = f"{self.settings.rpm:g} requests/min" if self.settings.rpm > 0 else "no rpm limit"
        return (f"{self.url} model {self.settings.model} ({self.settings.concurrency} at once, "
                f"{limit})")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._workers:
                return
            self._stopping = False
            self._workers = [threading.Thread(target=self._work, name=f"remote-{i}", daemon=True)
                             for i in range(self.settings.concurrency)]
        for worker in self._workers:
            worker.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cv:
            self._stopping = True
            workers, self._workers = self._workers, []
            for task in self._in_flight:
                if task.call is not None:
                    task.call.abort()
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def running(self) -> bool:
        return bool(self._workers) and not self._stopping

    # --- the job side --------------------------------------------------------------------------
    def transcribe(self, windows: Iterable[Any], options: DecodeOptions,
                   cancel: threading.Event, *, progress: Callable[..., None] | None = None,
                   priority: int = 0) -> Iterator[WindowResult]:
        """Window results in window order. Raises errors.Cancelled soon after `cancel` is set
        (in-flight requests are cut off), JobError when the remote refuses or stays down.
        `progress(position, message)`: what the job is waiting for (circuit, degradation)."""
        if not self.running:
            raise JobError(grpc.StatusCode.UNAVAILABLE, "the transcription engine is not running")
        if options.task not in ("transcribe", "translate"):
            raise JobError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"unknown task {options.task!r}: use 'transcribe' or 'translate'")
        # enough windows ahead to keep every slot busy, few enough that a window's wait for a
        # slot measures how far the remote is behind (the degradation signal)
        job = _Job(options, cancel, progress, priority,
                   max_pending=self.settings.concurrency + 2)
        return self._results(job, iter(windows))

    def _results(self, job: _Job, windows: Iterator[Any]) -> Iterator[WindowResult]:
        with self._cv:
            self._jobs.append(job)
        feeder = threading.Thread(target=self._feed, args=(job, windows), name="remote-feeder",
                                  daemon=True)
        feeder.start()
        try:
            while True:
                with self._cv:
                    while True:
                        if job.cancel.is_set():
                            raise Cancelled()
                        if job.error is not None:
                            raise job.error
                        if job.order and job.order[0].done:
                            task = job.order.popleft()
                            self._cv.notify_all()  # the feeder may take another window
                            break
                        if job.feed_done and not job.order:
                            return
                        if not self.running:
                            raise JobError(grpc.StatusCode.UNAVAILABLE,
                                           "the server is shutting down; submit the job again")
                        self._cv.wait(0.1)
                assert task.result is not None
                job.reached = task.result.end
                yield task.result
        finally:
            with self._cv:
                job.closed = True
                for task in job.order:  # cut off this job's requests in flight
                    if task.call is not None:
                        task.call.abort()
                job.order.clear()
                if job in self._jobs:
                    self._jobs.remove(job)
                self._cv.notify_all()

    def _feed(self, job: _Job, windows: Iterator[Any]) -> None:
        try:
            for window in windows:
                with self._cv:
                    while len(job.order) >= job.max_pending and not job.dead:
                        self._cv.wait(0.1)
                    if job.dead:
                        return
                    task = _Task(job, window, self.clock())
                    job.order.append(task)
                    heapq.heappush(self._queue, (-job.priority, next(self._arrival), task))
                    self._cv.notify_all()
        except JobError as exc:
            job.error = job.error or exc
        except Exception as exc:  # a decoder or segmenter bug must not hang the job
            job.error = job.error or JobError(grpc.StatusCode.INTERNAL,
                                              f"reading the audio failed: {exc}")
        finally:
            with self._cv:
                job.feed_done = True
                self._cv.notify_all()

    def _notify(self, job: _Job, message: str, *, repeat: bool = False) -> None:
        """A progress message to the job; a repeated one (a wait) at most every NOTIFY_EVERY s."""
        now = self.clock()
        if job.progress is None or job.dead or (repeat and now - job.notified_at < NOTIFY_EVERY):
            return
        job.notified_at = now
        job.progress(job.reached, message)

    # --- the worker side -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopping:
                        return
                    task = self._next_task()
                    if task is not None:
                        break
                    # a free slot and no window waiting: the remote keeps up
                    self._degrade(self.degradation.observe(0.0, idle=True))
                    if self._announcements:
                        break  # tell the jobs first, then look again
                    self._cv.wait(TICK)
                if task is not None:
                    task.call = Call()
                    self._in_flight.add(task)
                    self.metrics.remote_in_flight.set(len(self._in_flight))
            self._announce()
            if task is None:
                continue
            try:
                task.result = self._transcribe(task)
            except Cancelled:
                pass  # the job is gone; its loop raises for it
            except JobError as exc:
                with self._cv:
                    task.job.error = task.job.error or exc
            except Exception as exc:  # noqa: BLE001 - a bug fails the job, not the worker
                log.exception("remote engine: window %s failed", task.window.index)
                with self._cv:
                    task.job.error = task.job.error or JobError(
                        grpc.StatusCode.INTERNAL, f"remote engine error: {exc!r}")
            finally:
                with self._cv:
                    task.done = True
                    self._in_flight.discard(task)
                    self.metrics.remote_in_flight.set(len(self._in_flight))
                    self._cv.notify_all()

    def _next_task(self) -> _Task | None:
        """The next live window, highest priority first, then in arrival order (under _cv)."""
        while self._queue:
            _, _, task = heapq.heappop(self._queue)
            if task.job.dead:
                continue
            wait = self.clock() - task.enqueued
            self.metrics.remote_queue_wait.observe(wait)
            self._degrade(self.degradation.observe(wait))
            return task
        return None

    def _degrade(self, step: int) -> None:
        if not step:
            return
        level = self.degradation.level
        self.metrics.remote_degradation_level.set(level)
        self.metrics.remote_degradation_steps.labels(direction="down" if step > 0 else "up").inc()
        if step > 0:
            message = (f"remote engine stepped down to level {level} ({LEVELS[level]}): windows "
                       f"waited over {self.degradation.after:g} s for {self.url}")
        else:
            message = f"remote engine stepped back up to level {level} ({LEVELS[level]})"
        log.info("%s", message)
        # told once the lock is let go: a progress event writes to the job store
        self._announcements.append((list(self._jobs), message))

    def _announce(self) -> None:
        with self._cv:
            pending, self._announcements = self._announcements, []
        for jobs, message in pending:
            for job in jobs:
                self._notify(job, message)

    def _circuit_changed(self, state: str) -> None:
        for name in STATES:
            self.metrics.remote_circuit_state.labels(state=name).set(1 if name == state else 0)
        if state == "open":
            self.metrics.remote_circuit_opened.inc()
            log.warning("remote %s: circuit open after %d failures in a row (%s)", self.url,
                        self.circuit.failures, self.circuit.last_error)
        elif state == CLOSED:
            log.info("remote %s: circuit closed", self.url)

    # --- one window ----------------------------------------------------------------------------
    def _transcribe(self, task: _Task) -> WindowResult:
        job = task.job
        audio = wav_bytes(task.window.samples)

        def sleep(seconds: float) -> None:
            self._sleep(job, seconds)

        retrying = Retrying(
            retry=retry_if_exception_type((Transient, RateLimited)),
            wait=self._backoff,
            # a remote that never recovers is caught by the circuit's bound; this also ends a
            # remote that keeps answering 429 (which does not count as down)
            stop=stop_after_delay(self.settings.down_timeout),
            sleep=sleep,
            reraise=True,
        )
        since = self.clock()
        try:
            for attempt in retrying:
                with attempt:
                    answer = self._attempt(task, audio, since)
        except RateLimited as exc:
            raise JobError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"remote {self.url} kept refusing requests as over its rate limit "
                           f"for {self.settings.down_timeout:g} s ({exc})") from exc
        except Transient as exc:
            raise self._down_error(str(exc)) from exc
        return window_result(task.window, answer, job.options)

    def _backoff(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after  # the bucket is paused for as long: every request waits
        if self.circuit.state != CLOSED:
            return 0.0  # the circuit paces the retries now (and the job is told it waits)
        return float(wait_random_exponential(multiplier=0.5, max=8.0)(retry_state))

    def _sleep(self, job: _Job, seconds: float) -> None:
        """Sleep, but end within 0.1 s of a cancel (tenacity's sleeps and our own waits)."""
        deadline = time.monotonic() + seconds
        while True:
            if job.dead or self._stopping:
                raise Cancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def _attempt(self, task: _Task, audio: bytes, since: float) -> dict[str, Any]:
        job = task.job
        probe = self._pass_circuit(job, since)
        try:
            waited = self.bucket.acquire(lambda: job.dead or self._stopping,
                                         sleep=lambda s: self._sleep(job, s))
            if waited < 0:
                raise Cancelled()
            if waited > 0:
                self.metrics.remote_rate_limited_seconds.inc(waited)
            level = self.degradation.level
            request = RemoteRequest(
                audio=audio,
                language=job.options.language,
                prompt=job.options.initial_prompt,
                translate=job.options.task == "translate",
                words=level < 2,
                temperature=0.0 if level >= 1 else None,
            )
            assert task.call is not None
            started = time.monotonic()
            try:
                answer = self.client.transcribe(request, task.call)
            finally:
                self.metrics.remote_request_seconds.observe(time.monotonic() - started)
        except Aborted as exc:
            self.circuit.release(probe)
            self.metrics.remote_requests.labels(outcome="cancelled").inc()
            raise Cancelled() from exc
        except Cancelled:
            self.circuit.release(probe)
            raise
        except Transient as exc:
            self.metrics.remote_requests.labels(outcome="transient").inc()
            self.metrics.remote_failures.inc()
            self.circuit.failure(str(exc), probe)
            log.info("remote %s: window %s: %s", self.url, task.window.index, exc)
            raise
        except RateLimited as exc:
            self.metrics.remote_requests.labels(outcome="rate_limited").inc()
            self.circuit.success(probe)  # the remote answered: it is up
            if exc.retry_after is not None:
                self.bucket.pause_for(exc.retry_after)
            log.info("remote %s: 429, retry after %s s", self.url, exc.retry_after)
            raise
        except Rejected as exc:
            self.metrics.remote_requests.labels(outcome="rejected").inc()
            self.circuit.success(probe)
            raise self._rejected_error(exc) from exc
        except BaseException:
            self.circuit.release(probe)  # a bug of ours: the next request may probe
            raise
        finally:
            self.metrics.remote_consecutive_failures.set(self.circuit.failures)
        self.metrics.remote_requests.labels(outcome="ok").inc()
        self.circuit.success(probe)
        self.metrics.remote_consecutive_failures.set(0)
        return answer

    def _pass_circuit(self, job: _Job, since: float) -> bool:
        """Wait while the circuit is open (telling the job); a window that has been trying
        since `since` gives up past the down bound (each window gets the whole bound, so a job
        that comes in during a long outage still waits for a probe). Returns whether this
        request is the half-open probe."""
        while True:
            if job.dead or self._stopping:
                raise Cancelled()
            wait, probe = self.circuit.allow()
            if wait <= 0:
                return probe
            down = self.circuit.down_for()
            if self.clock() - since > self.settings.down_timeout:
                raise self._down_error(self.circuit.last_error)
            self._notify(job, f"remote {self.url} unavailable for {down:.0f} s, waiting "
                              f"(circuit open; giving up after "
                              f"{self.settings.down_timeout:g} s)", repeat=True)
            self._sleep(job, min(wait, 0.5))

    def _down_error(self, reason: str) -> JobError:
        down = self.circuit.down_for()
        return JobError(grpc.StatusCode.UNAVAILABLE,
                        f"remote {self.url} unavailable for {down:.0f} s ({reason}); gave up "
                        f"after --remote-down-timeout {self.settings.down_timeout:g} s")

    def _rejected_error(self, exc: Rejected) -> JobError:
        detail = f": {exc}" if str(exc) else ""
        if exc.status == 401:
            return JobError(grpc.StatusCode.UNAUTHENTICATED,
                            f"remote {self.url} answered 401, API key rejected{detail}")
        if exc.status == 403:
            return JobError(grpc.StatusCode.PERMISSION_DENIED,
                            f"remote {self.url} answered 403, API key rejected (not allowed)"
                            f"{detail}")
        what = (f"model {self.settings.model!r} or a request field" if exc.status in (400, 404)
                else "the request")
        return JobError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"remote {self.url} refused {what} (HTTP {exc.status}){detail}")


def window_result(window: Any, answer: dict[str, Any], options: DecodeOptions) -> WindowResult:
    """The remote's verbose_json for one window as a WindowResult with absolute times: segment
    times clamped into the window, words (top-level, as OpenAI gives them, or per segment)
    placed in the segment holding their middle, and whisper's no-speech rule applied."""
    offset = window.start_sample / SAMPLE_RATE
    duration = len(window.samples) / SAMPLE_RATE

    def clamp(value: Any, low: float) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return low
        return min(max(number, low), duration) if math.isfinite(number) else low

    raw_segments = [s for s in answer.get("segments") or [] if isinstance(s, dict)]
    if not raw_segments and str(answer.get("text") or "").strip():
        raw_segments = [{"start": 0.0, "end": duration, "text": answer["text"]}]
    top_words = [w for w in answer.get("words") or [] if isinstance(w, dict)]
    spans = []
    for s in raw_segments:
        start = clamp(s.get("start"), 0.0)
        spans.append((start, clamp(s.get("end"), start)))
    words_of: list[list[WordResult]] = [[] for _ in raw_segments]
    for i, s in enumerate(raw_segments):
        for w in s.get("words") or []:
            if isinstance(w, dict):
                words_of[i].append(_word(w, offset, clamp))
    for w in top_words:
        if not spans:
            break
        word = _word(w, offset, clamp)
        middle = (word.start + word.end) / 2 - offset
        best = min(range(len(spans)), key=lambda k: 0.0 if spans[k][0] <= middle <= spans[k][1]
                   else min(abs(middle - spans[k][0]), abs(middle - spans[k][1])))
        words_of[best].append(word)
    segments = []
    for s, (start, end), words in zip(raw_segments, spans, words_of, strict=True):
        text = str(s.get("text") or "")
        if not text.strip():
            continue
        avg_logprob = _number(s.get("avg_logprob"), 0.0)
        no_speech = _number(s.get("no_speech_prob"), 0.0)
        if (options.no_speech_threshold is not None and no_speech > options.no_speech_threshold
                and (options.logprob_threshold is None
                     or avg_logprob < options.logprob_threshold)):
            continue  # whisper's rule: silence, whatever text came with it
        segments.append(SegmentResult(
            start=offset + start, end=offset + end, text=text, avg_logprob=avg_logprob,
            no_speech_prob=no_speech, compression_ratio=_number(s.get("compression_ratio"), 0.0),
            temperature=_number(s.get("temperature"), 0.0),
            words=tuple(sorted(words, key=lambda w: w.start))))
    return WindowResult(int(window.index), offset, offset + duration, segments,
                        _language_code(answer.get("language")))


def _word(w: dict[str, Any], offset: float, clamp: Callable[[Any, float], float]) -> WordResult:
    text = str(w.get("word") or "")
    if text and not text.startswith(" "):
        text = " " + text  # whisper spells words with their leading space
    start = clamp(w.get("start"), 0.0)
    # OpenAI gives no word probability: 0 stands for "not given"
    return WordResult(text, offset + start, offset + clamp(w.get("end"), start),
                      _number(w.get("probability"), 0.0))


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _language_code(value: Any) -> str:
    """OpenAI answers a language name ("english"), others a code ("en")."""
    text = str(value or "").strip().lower()
    if not text:
        return ""
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    if text in LANGUAGES:
        return text
    return TO_LANGUAGE_CODE.get(text, text)
