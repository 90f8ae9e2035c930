"""`make bench-live`: live audio through a real server (offline tiny.en).

1. The LJSpeech reading (234 s) streamed at 1x real time in 100 ms frames, one session:
   final latency per sentence (from sending the frame that holds the sentence's last sample to
   receiving the final that holds it), WER of the finals, frames dropped, partial cadence; and
   the batch WER of the same file through the same server (upload + watch).
2. Overload: several sessions at once, each streaming the reading at 4x real time: per-source
   backpressure and drop statuses, audio dropped, peak RSS of the server, health checks
   answered during it, and the server still serving afterwards (health, a batch job).

    python -m bench.live [--streams 4] [--overload-pace 4] [--overload-seconds 30]

JSON to $BENCH_OUT (default bench/out/live.json) and a markdown table on stdout."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run import LJ, LJ_SEGMENTS, LJ_TEXT, PeakSampler  # noqa: E402
from tests.conftest import ServerProcess, wer  # noqa: E402

SR = 16000
FRAME = SR // 10  # 100 ms


def load_pcm(path: Path) -> bytes:
    import subprocess

    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac",
                           "1", "-ar", str(SR), "-f", "s16le", "-"], capture_output=True,
                          check=True).stdout


def sentences() -> list[tuple[float, float]]:
    lines = LJ_SEGMENTS.read_text().splitlines()[1:]
    return [(float(a), float(b)) for _, a, b, _ in (line.split("\t") for line in lines)]


class Stream:
    """One TranscribeLive call fed at `pace` from a thread; events recorded with their
    arrival time."""

    def __init__(self, target: str, pcm: bytes, pace: float, source: str = "mic",
                 seconds: float | None = None) -> None:
        import grpc
        from longscribe.v1 import transcription_pb2 as pb
        from longscribe.v1 import transcription_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.TranscriptionServiceStub(self.channel)
        self.pcm = pcm if seconds is None else pcm[:int(seconds * SR) * 2]
        self.pace = pace
        self.source = source
        self.sent: list[tuple[int, float]] = []  # (samples sent so far, when)
        self.events: list[tuple[float, Any]] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def requests(self) -> Iterator[Any]:
        pb = self.pb
        yield pb.LiveRequest(config=pb.LiveConfig(sources=[self.source], sample_rate=SR,
                                                  encoding="pcm_s16le"))
        start = time.monotonic()
        for i in range(0, len(self.pcm), FRAME * 2):
            samples = i // 2
            delay = start + samples / SR / self.pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            chunk = self.pcm[i:i + FRAME * 2]
            yield pb.LiveRequest(audio=pb.LiveAudio(source=self.source, data=chunk))
            self.sent.append((samples + len(chunk) // 2, time.monotonic()))

    def _run(self) -> None:
        import grpc

        try:
            for event in self.stub.TranscribeLive(self.requests()):
                self.events.append((time.monotonic(), event))
        except grpc.RpcError as err:
            self.error = f"{err.code().name}: {err.details()}"
        finally:
            self.channel.close()

    def start(self) -> Stream:
        self.thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def of(self, kind: str) -> list[tuple[float, Any]]:
        return [(t, getattr(e, kind)) for t, e in self.events if e.WhichOneof("event") == kind]

    def sent_at(self, sample: int) -> float | None:
        for count, at in self.sent:
            if count >= sample:
                return at
        return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_realtime(target: str, pcm: bytes) -> dict[str, Any]:
    stream = Stream(target, pcm, 1.0).start()
    stream.join()
    if stream.error:
        raise RuntimeError(f"the live stream failed: {stream.error}")
    finals = stream.of("final")
    latencies, missing = [], 0
    for _start, end in sentences():
        # the first final (in arrival order) that holds this sentence's end
        holder = next(((t, f) for t, f in finals if f.start - 0.05 <= end <= f.end + 0.05), None)
        sent = stream.sent_at(int(end * SR))
        if holder is None or sent is None:
            missing += 1
            continue
        latencies.append(holder[0] - sent)
    text = " ".join(f.text for _, f in finals)
    partial_gaps = []
    by_utt: dict[int, list[float]] = {}
    for t, p in stream.of("partial"):
        by_utt.setdefault(p.utterance, []).append(t)
    for times in by_utt.values():
        partial_gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
    statuses = [s for _, s in stream.of("status")]
    ends = [e for _, e in stream.of("end")]
    dropped_frames = max((s.dropped_frames for s in statuses), default=0)
    return {
        "final_latency_p50_s": round(percentile(latencies, 50), 3),
        "final_latency_p95_s": round(percentile(latencies, 95), 3),
        "final_latency_max_s": round(max(latencies), 3) if latencies else None,
        "server_latency_p95_s": round(percentile([f.latency_seconds for _, f in finals], 95), 3),
        "sentences": len(sentences()),
        "sentences_without_final": missing,
        "finals": len(finals),
        "partials": len(stream.of("partial")),
        "partial_gap_p95_s": round(percentile(partial_gaps, 95), 3),
        "wer": round(wer(LJ_TEXT.read_text(), text), 4),
        "dropped_frames": int(dropped_frames),
        "dropped_seconds": round(ends[0].dropped_seconds, 3) if ends else None,
        "end_received": bool(ends),
    }


def batch_wer(target: str) -> float:
    from longscribe.client.client import LongscribeClient

    with LongscribeClient(target, timeout=60) as client:
        return round(wer(LJ_TEXT.read_text(), client.transcribe(str(LJ)).text), 4)


def health_ok(target: str, timeout: float = 2.0) -> tuple[bool, float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            ok = False
    return ok, time.monotonic() - started


def run_overload(server: ServerProcess, pcm: bytes, streams: int, pace: float,
                 seconds: float) -> dict[str, Any]:
    checks: list[tuple[bool, float]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            checks.append(health_ok(server.target))
            stop.wait(0.5)

    prober = threading.Thread(target=probe, daemon=True)
    with PeakSampler(server.pid) as sampler:
        prober.start()
        started = time.monotonic()
        running = [Stream(server.target, pcm, pace, source=f"s{i}", seconds=seconds * pace)
                   .start() for i in range(streams)]
        for s in running:
            s.join(timeout=600)
        wall = time.monotonic() - started
        stop.set()
        prober.join()
    per_source = []
    for s in running:
        statuses = [st for _, st in s.of("status")]
        states = [st.state for st in statuses]
        ends = [e for _, e in s.of("end")]
        per_source.append({
            "source": s.source,
            "backpressure": s.pb.LIVE_SOURCE_BACKPRESSURE in states,
            "dropping": s.pb.LIVE_SOURCE_DROPPING in states,
            "closed": s.pb.LIVE_SOURCE_DROPPED in states,
            "dropped_seconds": round(max((st.dropped_seconds for st in statuses), default=0.0), 2),
            "finals": len(s.of("final")),
            "status_events": len(statuses),
            "ended": bool(ends),
            "error": s.error,
        })
    serving, _ = health_ok(server.target)
    job_ok = False
    if serving:
        from longscribe.client.client import LongscribeClient

        from tests.conftest import JFK

        with LongscribeClient(server.target, timeout=60) as client:
            job_ok = bool(client.transcribe(str(JFK)).text)
    latencies = [lat for ok, lat in checks if ok]
    return {
        "streams": streams,
        "pace": pace,
        "audio_seconds_per_stream": seconds * pace,
        "wall_seconds": round(wall, 1),
        "backpressure_seen": all(p["backpressure"] or p["dropping"] for p in per_source),
        "dropped_seconds": round(sum(p["dropped_seconds"] for p in per_source), 2),
        "sources_closed": sum(p["closed"] for p in per_source),
        "server_serving_after": serving and job_ok,
        "health_checks": len(checks),
        "health_failed": sum(not ok for ok, _ in checks),
        "health_p95_ms": round(1000 * percentile(latencies, 95), 1),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "per_source": per_source,
    }


def table(report: dict[str, Any]) -> str:
    rt, ov = report["realtime"], report["overload"]
    rows = [
        ("final latency p50 / p95 / max (1x, per sentence)",
         f"{rt['final_latency_p50_s']:.2f} / {rt['final_latency_p95_s']:.2f} / "
         f"{rt['final_latency_max_s']:.2f} s"),
        ("WER live / batch (same server)", f"{100 * report['wer']:.2f} % / "
         f"{100 * report['batch_wer']:.2f} %"),
        ("frames dropped at 1x", str(report["dropped_frames"])),
        ("finals / partials; partial gap p95", f"{rt['finals']} / {rt['partials']}; "
         f"{rt['partial_gap_p95_s']:.2f} s"),
        (f"overload: {ov['streams']} streams at {ov['pace']:g}x, backpressure on every source",
         str(ov["backpressure_seen"])),
        ("overload: audio dropped (oldest), sources closed",
         f"{ov['dropped_seconds']:.1f} s, {ov['sources_closed']}"),
        ("overload: health checks failed / p95", f"{ov['health_failed']} of "
         f"{ov['health_checks']} / {ov['health_p95_ms']:.0f} ms"),
        ("overload: peak RSS; serving after", f"{ov['peak_rss_mb']:.0f} MB; "
         f"{ov['server_serving_after']}"),
    ]
    return "\n".join(["| measure | value |", "|---|---|"] +
                     [f"| {a} | {b} |" for a, b in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--overload-pace", type=float, default=4.0)
    parser.add_argument("--overload-seconds", type=float, default=30.0,
                        help="wall seconds each overload stream sends for")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench/out/live.json"))
    args = parser.parse_args(argv)
    pcm = load_pcm(LJ)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        server = ServerProcess(Path(tmp) / "data", "--log-level", "WARNING").start(timeout=300)
        try:
            batch = batch_wer(server.target)
            realtime = run_realtime(server.target, pcm)
            overload = run_overload(server, pcm, args.streams, args.overload_pace,
                                    args.overload_seconds)
        finally:
            code = server.stop()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        # the CPU's 1/5/15-minute load before and after: other work on a shared machine
        # competes with the server's (latency most of all)
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "final_latency_p50_s": realtime["final_latency_p50_s"],
        "final_latency_p95_s": realtime["final_latency_p95_s"],
        "wer": realtime["wer"],
        "batch_wer": batch,
        "dropped_frames": realtime["dropped_frames"],
        "overload": overload,
        "realtime": realtime,
        "server_exit": code,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
