"""One live session: its sources, the pump that moves each source's frames through the ring
buffer and the endpointer, and the decodes (finals on endpoints, partials of the open
utterance) on the shared engine.

Threads: nothing here owns a thread. `push` runs on the caller's thread (the RPC's event loop:
it only checks, decodes and queues a frame). A source's pump and its decodes run as tasks on
the runtime's two small thread pools, one at a time per source, so a hundred sessions cost a
hundred queues, not a hundred threads.

Backpressure: a source keeps at most MAX_PENDING_FINALS utterances waiting for the engine;
past that its pump stops taking frames, so they wait in the source's bounded queue, whose depth
is what the client is told (backpressure) and whose overflow policy decides what goes.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from longscribe.v1 import transcription_pb2 as pb

from .. import metrics
from ..chunk_queue import OverflowPolicy, QueueClosed
from ..errors import Cancelled, JobError, invalid
from ..segment import Window
from ..transcriber import SAMPLE_RATE, DecodeOptions, WindowResult
from .endpoint import Endpointer, Utterance
from .frames import LiveSettings, decode_frame
from .source import ArrivalTimes, Frame, RingBuffer, SourceQueue, StatusTracker

log = logging.getLogger(__name__)

MAX_PENDING_FINALS = 2  # utterances of one source waiting for (or in) the engine
# final segments whose text conditions the next final of their source, as transcribe()
# conditions a window on the text before it (condition_on_previous_text; the engine keeps the
# prompt's last half-context of tokens, as transcribe() does): a fragment cut at a pause is
# decoded with its sentence's start, and names keep their spelling
CONTEXT_SEGMENTS = 64
PARTIAL_CONTEXT_SEGMENTS = 3  # a partial's prompt: shorter, so it costs less
FINAL_PRIORITY = 2  # Engine.transcribe(priority=...): higher is taken first; batch jobs are 0
PARTIAL_PRIORITY = 1
MIN_PARTIAL_SECONDS = 0.5  # no partial of less audio than this
STATES = {"ok": pb.LIVE_SOURCE_OK, "backpressure": pb.LIVE_SOURCE_BACKPRESSURE,
          "dropping": pb.LIVE_SOURCE_DROPPING, "dropped": pb.LIVE_SOURCE_DROPPED}


@dataclass(frozen=True)
class LiveLimits:
    queue_seconds: float = 8.0
    stale_seconds: float = 6.0  # a frame queued longer than this is dropped (drop/reject)
    max_frame_seconds: float = 2.0
    endpoint_ms: int = 300
    partial_interval: float = 0.7
    drop_source_after: float = 10.0
    ring_seconds: float = 30.0
    max_utterance_seconds: float = 20.0
    lead_ms: int = 400  # audio kept before an utterance's first speech frame

    @classmethod
    def from_config(cls, config: Any) -> LiveLimits:
        return cls(queue_seconds=config.live_queue_seconds,
                   stale_seconds=max(config.live_queue_seconds, 6.0),
                   max_frame_seconds=config.live_max_frame_seconds,
                   endpoint_ms=config.live_endpoint_ms,
                   partial_interval=config.live_partial_interval,
                   drop_source_after=config.live_drop_source_after)


# Called with each final before it is sent (stores it in the session's job; may block).
FinalSink = Callable[[pb.LiveFinal], None]


@dataclass
class _Pending:
    utterance: Utterance
    window: Window
    heard_at: float | None  # when the utterance's last speech arrived


@dataclass
class _Source:
    name: str
    queue: SourceQueue
    ring: RingBuffer
    endpointer: Endpointer
    tracker: StatusTracker = field(default_factory=StatusTracker)
    arrivals: ArrivalTimes = field(default_factory=ArrivalTimes)
    next_sample: int = 0  # timeline position of the next frame received
    lock: threading.Lock = field(default_factory=threading.Lock)
    pumping: bool = False
    finals: deque[_Pending] = field(default_factory=deque)
    busy: str = ""  # "final" / "partial" while a decode of this source runs
    cancel_partial: threading.Event | None = None
    last_partial_at: float = 0.0  # when the last partial decode started
    partial_done_at: float = 0.0  # ... and ended
    partial_cost: float = 0.0  # how long it took
    last_partial_end: int = 0
    last_final_index: int = -1  # highest utterance index sent to the engine as a final
    closed: bool = False  # dropped for overflowing: frames are ignored
    finals_sent: int = 0
    # the texts of this source's latest final segments: its next decodes are conditioned on them
    context: deque[str] = field(default_factory=lambda: deque(maxlen=CONTEXT_SEGMENTS))
    # the open utterance's index and its last two partial texts (see settled_words)
    partial_texts: tuple[int, tuple[str, ...]] = (-1, ())

    def idle(self) -> bool:
        return not self.pumping and not self.busy and not self.finals


class LiveSession:
    """See the module docstring. `emit` receives every LiveEvent (from any thread)."""

    def __init__(self, engine: Any, settings: LiveSettings, options: DecodeOptions,
                 emit: Callable[[pb.LiveEvent], None], *, pumps: Executor, decoders: Executor,
                 limits: LiveLimits = LiveLimits(), sink: FinalSink | None = None,
                 session_id: str = "", positions: dict[str, int] | None = None,
                 next_utterance: dict[str, int] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.options = options
        # partials: one fast greedy pass, no temperature fallback (the final has it)
        # and a draft: text only (no word alignment, no second look at skipped speech)
        self.partial_options = replace(options, temperatures=options.temperatures[:1],
                                       draft=True)
        self._accepts_prefix = bool(getattr(engine, "accepts_prefix", False))
        self.emit = emit
        self.sink = sink
        self.limits = limits
        self.session_id = session_id
        self._pumps = pumps
        self._decoders = decoders
        self._priority = "priority" in inspect.signature(engine.transcribe).parameters
        self._cancel = threading.Event()  # the session is being torn down: stop decoding
        self._idle = threading.Condition()
        self.error: JobError | None = None
        self.on_fail: Callable[[JobError], None] | None = None  # told once, from any thread
        self.max_frame = int(limits.max_frame_seconds * SAMPLE_RATE)
        positions = positions or {}
        next_utterance = next_utterance or {}
        self.sources: dict[str, _Source] = {}
        for name in settings.sources:
            at = positions.get(name, 0)
            ring = RingBuffer(int(limits.ring_seconds * SAMPLE_RATE))
            ring.start = ring.end = at
            # the trailing pad is all the non-speech heard before the endpoint: free audio
            ep = Endpointer(endpoint_ms=limits.endpoint_ms, pad_ms=limits.endpoint_ms,
                            lead_ms=limits.lead_ms, max_utterance_s=limits.max_utterance_seconds,
                            first_index=next_utterance.get(name, 0))
            ep.pos = ep.floor = at
            self.sources[name] = _Source(
                name, SourceQueue(name, settings.overflow, limits.queue_seconds,
                                  limits.stale_seconds), ring, ep, next_sample=at,
                last_partial_end=at)

    # --- input (the RPC's thread) ------------------------------------------------------------
    def source(self, name: str) -> _Source:
        if not name and len(self.sources) == 1:
            return next(iter(self.sources.values()))
        src = self.sources.get(name)
        if src is None:
            raise invalid(f"unknown source {name[:80]!r}: this session's sources are "
                          f"{', '.join(self.sources)} (name them all in LiveConfig.sources)")
        return src

    def push(self, name: str, data: bytes) -> None:
        """Check, decode and queue one frame. Raises JobError(INVALID_ARGUMENT) for a bad one.
        With the "block" policy this waits for room (the RPC layer uses prepare/offer instead,
        so no thread waits)."""
        src, samples = self.prepare(name, data)
        self.offer(src, samples)

    def prepare(self, name: str, data: bytes) -> tuple[_Source, Any]:
        """A frame checked and decoded, not yet queued."""
        src = self.source(name)
        samples = decode_frame(data, self.settings.encoding, self.max_frame)
        metrics.add_audio_bytes(len(data), source="live")
        return src, samples

    def offer(self, src: _Source, samples: Any, timeout: float | None = None) -> bool:
        """Queue a decoded frame. False only with the "block" policy, when the queue had no
        room within `timeout` (then nothing happened: offer it again)."""
        if src.closed or len(samples) == 0:
            if src.closed:
                src.queue.dropped_frames += 1
                src.queue.dropped_samples += len(samples)
                metrics.add_live_dropped(1, "source_dropped")
            return True
        now = time.monotonic()
        with src.lock:  # timeline positions in arrival order
            frame = Frame(src.next_sample, samples, now)
            src.next_sample += len(samples)
        try:
            accepted = src.queue.put(frame, timeout)
        except QueueClosed:
            return True  # the source was closed meanwhile
        if not accepted and src.queue.policy is OverflowPolicy.BLOCK:
            with src.lock:  # not queued: its samples are offered again at the same position
                src.next_sample -= len(samples)
            self._status(src, 0)
            return False
        drops = src.queue.take_drops()
        if drops:
            reason = "rejected" if not accepted and src.queue.policy is OverflowPolicy.REJECT \
                else "overflow"
            metrics.add_live_dropped(drops, reason)
        self._status(src, drops)
        self._schedule_pump(src)
        return True

    @property
    def blocking(self) -> bool:
        return self.settings.overflow == "block"

    # --- status --------------------------------------------------------------------------------
    def _status(self, src: _Source, drops: int) -> None:
        if src.closed:
            return
        fill = src.queue.queued_seconds / src.queue.capacity_seconds
        with src.lock:
            state = src.tracker.update(fill, drops)
            since = src.tracker.overflowing_since
        if since is not None and time.monotonic() - since >= self.limits.drop_source_after:
            self._drop_source(src)
            return
        if state is not None:
            self._send_status(src, state)

    def _send_status(self, src: _Source, state: str, message: str = "") -> None:
        q = src.queue
        if not message and state == "backpressure":
            message = "the server is falling behind this source"
        elif not message and state == "dropping":
            what = "new frames are refused" if q.policy is OverflowPolicy.REJECT else \
                "the oldest queued audio is dropped"
            message = f"the source's queue is full: {what}"
        self.emit(pb.LiveEvent(status=pb.LiveStatus(
            source=src.name, state=STATES[state], queue_depth=q.depth,
            queue_seconds=round(q.queued_seconds, 3), dropped_seconds=round(q.dropped_seconds, 3),
            dropped_frames=q.dropped_frames, message=message)))

    def _drop_source(self, src: _Source) -> None:
        """The source overflowed for `drop_source_after` s: close it, free its queue, tell the
        client; the rest of the session goes on."""
        with src.lock:
            if src.closed:
                return
            src.closed = True
        flushed = src.queue.close()
        metrics.add_live_dropped(flushed, "source_dropped")
        log.warning("live session %s: source %s kept overflowing for %.0f s; closed",
                    self.session_id, src.name, self.limits.drop_source_after)
        self._send_status(src, "dropped", (
            f"source {src.name!r} kept overflowing for {self.limits.drop_source_after:.0f} s "
            "(the server cannot keep up with it): it is closed and its later frames are "
            "ignored; the other sources go on"))
        with self._idle:
            self._idle.notify_all()

    # --- the pump (pool thread, one at a time per source) -------------------------------------
    def _schedule_pump(self, src: _Source) -> None:
        with src.lock:
            if src.pumping or src.closed or len(src.finals) >= MAX_PENDING_FINALS:
                return
            src.pumping = True
        try:
            self._pumps.submit(self._pump, src)
        except RuntimeError:  # the pool is shut down: the server is stopping
            with src.lock:
                src.pumping = False

    def _pump(self, src: _Source) -> None:
        try:
            while not self._cancel.is_set():
                with src.lock:
                    if src.closed or len(src.finals) >= MAX_PENDING_FINALS:
                        break  # gated: frames wait in the queue (backpressure)
                frame = src.queue.get()
                if frame is None:
                    with src.lock:
                        if src.queue.depth == 0:
                            break
                    continue
                drops = src.queue.take_drops()
                if drops:
                    metrics.add_live_dropped(drops, "stale")
                self._take(src, frame)
                self._status(src, drops)
        except Exception:  # noqa: BLE001 - a bug must end the session with a status, not hang it
            log.exception("live session %s: source %s failed", self.session_id, src.name)
            self.fail(JobError(grpc.StatusCode.INTERNAL, f"processing source {src.name!r} "
                               "failed on the server"))
        finally:
            with src.lock:
                src.pumping = False
            with self._idle:
                self._idle.notify_all()
        # a frame may have come in between the last empty get and pumping = False
        if src.queue.depth and not self._cancel.is_set():
            self._schedule_pump(src)

    def _take(self, src: _Source, frame: Frame) -> None:
        ep = src.endpointer
        closed: list[Utterance] = []
        if frame.start_sample != src.ring.end:
            closed += ep.restart(frame.start_sample)  # audio was dropped in between
            src.ring.start = src.ring.end = frame.start_sample
            for utt in closed:  # cut out before the ring moves on
                self._enqueue_final(src, utt)
            closed = []
        src.ring.write(frame.start_sample, frame.samples)
        src.arrivals.add(frame.end_sample, frame.received_at)
        for utt in ep.push(frame.start_sample, frame.samples):
            self._enqueue_final(src, utt)
        self._maybe_partial(src)

    def _enqueue_final(self, src: _Source, utt: Utterance) -> None:
        window = Window(utt.index, utt.start, src.ring.read(utt.start, utt.end), utt.speech)
        pending = _Pending(utt, window, src.arrivals.when(utt.speech_end))
        with src.lock:
            src.finals.append(pending)
            src.last_final_index = max(src.last_final_index, utt.index)
            if src.busy == "partial" and src.cancel_partial is not None:
                src.cancel_partial.set()  # the final goes first
        self._kick(src)

    def _maybe_partial(self, src: _Source) -> None:
        if not self.settings.partials:
            return
        ep = src.endpointer
        start = ep.open_start
        if start is None or ep.pos - start < MIN_PARTIAL_SECONDS * SAMPLE_RATE:
            return
        if ep.pausing:
            # the endpoint may be a few frames away: a partial started now would hold the
            # engine when the final needs it (on a CPU a decode takes most of a second)
            return
        now = time.monotonic()
        engine_idle = self._engine_idle()
        with src.lock:
            if src.busy or src.finals or ep.pos <= src.last_partial_end:
                return
            # every partial_interval; while the engine has other work (batch jobs, other
            # sources), it spends at most half its time on this source's partials: on a busy
            # CPU a partial can take longer than the interval
            due = src.last_partial_at + self.limits.partial_interval
            if now < due or (now < src.partial_done_at + src.partial_cost and not engine_idle):
                return
            src.busy = "partial"
            src.cancel_partial = threading.Event()
            src.last_partial_at = now
            src.last_partial_end = ep.pos
            cancel = src.cancel_partial
            index, texts = src.partial_texts
        prefix = settled_words(*texts) if self._accepts_prefix and index == ep.next_index else ""
        window = Window(ep.next_index, start, src.ring.read(start, ep.pos), prefix=prefix)
        self._submit_decode(src, "partial", window, cancel, None)

    def _engine_idle(self) -> bool:
        idle = getattr(self.engine, "idle", None)  # engines without it: always share
        return bool(idle()) if idle is not None else False

    # --- decoding (pool thread, one at a time per source) -------------------------------------
    def _kick(self, src: _Source) -> None:
        with src.lock:
            if src.busy or not src.finals:
                return
            pending = src.finals[0]
            src.busy = "final"
        self._submit_decode(src, "final", pending.window, self._cancel, pending)

    def _submit_decode(self, src: _Source, kind: str, window: Window, cancel: threading.Event,
                       pending: _Pending | None) -> None:
        try:
            self._decoders.submit(self._decode, src, kind, window, cancel, pending)
        except RuntimeError:  # the pool is shut down
            self._decoded(src, kind)

    def _transcribe(self, window: Window, options: DecodeOptions, cancel: threading.Event,
                    priority: int) -> list[WindowResult]:
        extra = {"priority": priority} if self._priority else {}
        return list(self.engine.transcribe([window], options, cancel, **extra))

    def _decode(self, src: _Source, kind: str, window: Window, cancel: threading.Event,
                pending: _Pending | None) -> None:
        started = time.monotonic()
        try:
            if kind == "partial":
                self._partial(src, window, cancel)
            else:
                assert pending is not None
                self._final(src, pending)
        except Cancelled:
            pass
        except JobError as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("live session %s: decoding failed", self.session_id)
            self.fail(JobError(grpc.StatusCode.INTERNAL, f"decoding failed: {exc!r}"))
        finally:
            if kind == "partial":
                with src.lock:
                    src.partial_done_at = time.monotonic()
                    src.partial_cost = src.partial_done_at - started
            log.debug("live session %s: %s %s of %.1f s decoded in %.2f s", self.session_id,
                      src.name, kind, len(window.samples) / SAMPLE_RATE,
                      time.monotonic() - started)
            self._decoded(src, kind)

    def _decoded(self, src: _Source, kind: str) -> None:
        with src.lock:
            src.busy = ""
            src.cancel_partial = None
            if kind == "final" and src.finals:
                src.finals.popleft()
        with self._idle:
            self._idle.notify_all()
        if not self._cancel.is_set():
            self._kick(src)
            self._schedule_pump(src)  # room for another utterance: take frames again

    def _conditioned(self, options: DecodeOptions, src: _Source,
                     segments: int = CONTEXT_SEGMENTS) -> DecodeOptions:
        """`options` with the source's last `segments` finals after the client's own prompt."""
        with src.lock:
            recent = " ".join(list(src.context)[-segments:])
        if not recent:
            return options
        prompt = f"{options.initial_prompt or ''} {recent}".strip()
        return replace(options, initial_prompt=prompt)

    def _partial(self, src: _Source, window: Window, cancel: threading.Event) -> None:
        options = self._conditioned(self.partial_options, src, PARTIAL_CONTEXT_SEGMENTS)
        results = self._transcribe(window, options, cancel, PARTIAL_PRIORITY)
        text = f"{window.prefix} {_text(results)}".strip()
        with src.lock:
            stale = cancel.is_set() or window.index <= src.last_final_index
            index, texts = src.partial_texts
            if not stale and text:
                texts = texts if index == window.index else ()
                src.partial_texts = (window.index, (*texts, text)[-2:])
        if not stale and text:
            self.emit(pb.LiveEvent(partial=pb.LivePartial(
                source=src.name, utterance=window.index, start=window.start, end=window.end,
                text=text)))

    def _final(self, src: _Source, pending: _Pending) -> None:
        utt, window = pending.utterance, pending.window
        results = self._transcribe(window, self._conditioned(self.options, src), self._cancel,
                                   FINAL_PRIORITY)
        segments = [_segment(s, src.name) for r in results for s in r.segments]
        texts = [s.text.strip() for r in results for s in r.segments if s.text.strip()]
        sampled = any(s.temperature > 0.5 for r in results for s in r.segments)
        with src.lock:
            if sampled:  # as transcribe(): text of a high-temperature decode conditions nothing
                src.context.clear()
            else:
                src.context.extend(texts)
        final = pb.LiveFinal(source=src.name, utterance=utt.index,
                             start=round(utt.start / SAMPLE_RATE, 3),
                             end=round(utt.end / SAMPLE_RATE, 3),
                             text=" ".join(s.text.strip() for s in segments if s.text.strip()),
                             segments=segments)
        if self.sink is not None:
            self.sink(final)  # stored before it is sent: a reconnecting client finds it
        if pending.heard_at is not None:
            final.latency_seconds = round(time.monotonic() - pending.heard_at, 3)
            metrics.observe_live_final_latency(final.latency_seconds)
        src.finals_sent += 1
        self.emit(pb.LiveEvent(final=final))

    # --- the end --------------------------------------------------------------------------
    def finish(self, timeout: float = 120.0) -> bool:
        """End of input: every queued frame through the endpointer, the open utterances closed,
        every final decoded and sent. True when all of it was done within `timeout`."""
        deadline = time.monotonic() + timeout
        sources = list(self.sources.values())
        while True:  # a pump gated on a full final queue is restarted as finals complete
            for src in sources:
                self._schedule_pump(src)
            if not self._wait(lambda: all(not s.pumping for s in sources), deadline):
                return False
            if all(s.closed or s.queue.depth == 0 for s in sources):
                break
            with self._idle:
                self._idle.wait(0.05)
            if time.monotonic() > deadline or self._cancel.is_set():
                return False
        # no pump runs and no frame is left (no more pushes come): the endpointers are ours
        for src in sources:
            if not src.closed:
                for utt in src.endpointer.flush():
                    self._enqueue_final(src, utt)
        return self._wait(lambda: all(s.idle() for s in sources) or self._cancel.is_set(),
                          deadline) and not self._cancel.is_set()

    def _wait(self, done: Callable[[], bool], deadline: float) -> bool:
        with self._idle:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return done()
                self._idle.wait(min(left, 0.2))
        return True

    def fail(self, error: JobError) -> None:
        """Stop everything (a bad frame, an engine failure): decodes are cancelled, queues
        closed; the RPC ends with `error`."""
        first = self.error is None
        if first:
            self.error = error
        self.close()
        if first and self.on_fail is not None:
            self.on_fail(error)

    def close(self) -> None:
        """Free everything: cancel decodes, close and empty every queue. Idempotent."""
        self._cancel.set()
        for src in self.sources.values():
            with src.lock:
                if src.cancel_partial is not None:
                    src.cancel_partial.set()
                src.finals.clear()
            if not src.queue.queue.closed:
                src.queue.queue.flush("session closed")
                src.queue.queue.close()
        with self._idle:
            self._idle.notify_all()

    def wait_quiet(self, timeout: float = 10.0) -> bool:
        """After close(): until no pump or decode of this session runs any more."""
        return self._wait(lambda: all(not s.pumping and not s.busy
                                      for s in self.sources.values()),
                          time.monotonic() + timeout)

    def positions(self) -> dict[str, int]:
        return {name: src.next_sample for name, src in self.sources.items()}

    def next_utterances(self) -> dict[str, int]:
        return {name: src.endpointer.next_index for name, src in self.sources.items()}

    @property
    def finals_sent(self) -> int:
        return sum(s.finals_sent for s in self.sources.values())

    @property
    def dropped_seconds(self) -> float:
        return sum(s.queue.dropped_seconds for s in self.sources.values())

    @property
    def dropped_frames(self) -> int:
        return sum(s.queue.dropped_frames for s in self.sources.values())

    def end_event(self) -> pb.LiveEvent:
        return pb.LiveEvent(end=pb.LiveEnd(
            session_id=self.session_id,
            source_seconds={n: s / SAMPLE_RATE for n, s in self.positions().items()},
            finals=self.finals_sent, dropped_seconds=round(self.dropped_seconds, 3)))


def settled_words(*texts: str) -> str:
    """The words at the start of every text (LocalAgreement): two successive partials of an
    utterance, decoded from more and more of its audio, that agree on their first words have
    heard them whole. The next partial is given them as its prefix and decodes only what
    follows, so a partial costs the new words, not the whole utterance again."""
    if len(texts) < 2:
        return ""
    settled: list[str] = []
    for words in zip(*(t.split() for t in texts), strict=False):
        if any(w != words[0] for w in words):
            break
        settled.append(words[0])
    return " ".join(settled)


def _text(results: list[WindowResult]) -> str:
    return " ".join(s.text.strip() for r in results for s in r.segments if s.text.strip())


def _segment(s: Any, source: str) -> pb.Segment:
    return pb.Segment(start=s.start, end=s.end, text=s.text, avg_logprob=s.avg_logprob,
                      no_speech_prob=s.no_speech_prob, compression_ratio=s.compression_ratio,
                      temperature=s.temperature, source=source,
                      words=[pb.Word(word=w.word, start=w.start, end=w.end,
                                     probability=w.probability) for w in s.words])
