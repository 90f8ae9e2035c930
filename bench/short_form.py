"""Short-form fidelity: each utterance alone, through the service and through openai-whisper's
`transcribe()`, on the same audio.

    python -m bench.short_form [--set test|all] [--device auto|cpu|cuda] [--out PATH]

The long-form goal ("a long file as accurate as each of its utterances alone") only means
something if each utterance alone is itself transcribed as well as whisper does it. The clips:
the six LibriSpeech utterances, JFK, LJSpeech sentences cut from the long reading at their
known times, and LibriSpeech clips made 35 dB quieter or telephone-band (8 kHz, 300-3400 Hz),
each a 16 kHz wav. Every clip is uploaded as its own job, all at once (so the server batches
across them, as it would for many users). WER is pooled over all clips (errors / reference
words, whisper's EnglishTextNormalizer + jiwer). Writes JSON to --out and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.mix import LIBRISPEECH, Piece, _lj_times, _references, _render
from tests.conftest import ServerProcess

LJ_ALL = tuple(f"LJ001-{i:04d}" for i in range(1, 33))
LJ_TEST = ("LJ001-0002", "LJ001-0005", "LJ001-0009", "LJ001-0011", "LJ001-0016", "LJ001-0021",
           "LJ001-0024", "LJ001-0030")
SETS: dict[str, tuple[Piece, ...]] = {
    "test": tuple(Piece("speech", s) for s in (*LIBRISPEECH, "jfk.flac", *LJ_TEST))
    + tuple(Piece("speech", s, "quiet") for s in LIBRISPEECH[:3])
    + tuple(Piece("speech", s, "telephone") for s in LIBRISPEECH[3:]),
    "all": tuple(Piece("speech", s) for s in (*LIBRISPEECH, "jfk.flac", *LJ_ALL))
    + tuple(Piece("speech", s, "quiet") for s in LIBRISPEECH)
    + tuple(Piece("speech", s, "telephone") for s in LIBRISPEECH),
}


@dataclass(frozen=True)
class ShortClip:
    name: str  # source and effect
    path: Path
    reference: str


def build_clips(folder: Path, pieces: tuple[Piece, ...]) -> list[ShortClip]:
    references, lj_times = _references(), _lj_times()
    clips = []
    for i, piece in enumerate(pieces):
        name = f"{Path(piece.source).stem}-{piece.effect}"
        path = folder / f"{i:02d}-{name}.wav"
        _render(piece, path, lj_times, seed=i)
        clips.append(ShortClip(name, path, references[piece.source]))
    return clips


def pooled_wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    out = jiwer.process_words([normalize(r) for r in references],
                              [normalize(h) for h in hypotheses])
    words = out.hits + out.substitutions + out.deletions
    return (out.substitutions + out.deletions + out.insertions) / max(1, words)


def transcribe_alone(clips: list[ShortClip], device: str) -> list[str]:
    """openai-whisper's own transcribe() on each clip, the reference line."""
    import torch
    import whisper
    from longscribe.service.models import load_model

    torch.manual_seed(0)
    model = load_model("", device)
    fp16 = next(model.parameters()).is_cuda
    return [model.transcribe(whisper.load_audio(str(c.path)), fp16=fp16)["text"] for c in clips]


def service_alone(clips: list[ShortClip], target: str) -> list[str]:
    """Every clip uploaded as its own job at once, each transcript read back."""
    from longscribe.client.client import LongscribeClient

    with LongscribeClient(target, timeout=120) as client, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: client.transcribe(str(c.path)), clips))
    return [r.text for r in results]


def per_clip(clips: list[ShortClip], whisper_texts: list[str], service_texts: list[str]
             ) -> list[dict[str, Any]]:
    return [{"clip": c.name,
             "transcribe_wer": round(pooled_wer([c.reference], [w]), 4),
             "service_wer": round(pooled_wer([c.reference], [s]), 4),
             "transcribe": w.strip(), "service": s.strip()}
            for c, w, s in zip(clips, whisper_texts, service_texts, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/out/short_form.json")
    parser.add_argument("server_args", nargs="*", help="extra `longscribe serve` flags")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="longscribe-short-") as tmp:
        clips = build_clips(Path(tmp), SETS[args.set])
        started = time.perf_counter()
        whisper_texts = transcribe_alone(clips, args.device)
        whisper_wall = time.perf_counter() - started
        server = ServerProcess(Path(tmp) / "data", "--device", args.device, "--log-level",
                               "WARNING", *args.server_args).start(timeout=300)
        try:
            started = time.perf_counter()
            service_texts = service_alone(clips, server.target)
            service_wall = time.perf_counter() - started
        finally:
            server.stop()
    references = [c.reference for c in clips]
    report = {
        "set": args.set, "clips": len(clips), "server_args": args.server_args,
        "transcribe": {"wer": round(pooled_wer(references, whisper_texts), 4),
                       "wall_seconds": round(whisper_wall, 2)},
        "service": {"wer": round(pooled_wer(references, service_texts), 4),
                    "wall_seconds": round(service_wall, 2)},
        "per_clip": per_clip(clips, whisper_texts, service_texts),
    }
    report["gap_points"] = round((report["service"]["wer"] - report["transcribe"]["wer"]) * 100,
                                 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"| side | WER ({len(clips)} clips, each alone) | wall s |\n|---|---|---|\n"
          f"| openai-whisper `transcribe()` | {report['transcribe']['wer']:.2%} | "
          f"{whisper_wall:.1f} |\n| longscribe (one job per clip, all at once) | "
          f"{report['service']['wer']:.2%} | {service_wall:.1f} |")
    for row in report["per_clip"]:
        if row["service_wer"] > row["transcribe_wer"]:
            print(f"  worse: {row['clip']}: {row['service_wer']:.2%} vs "
                  f"{row['transcribe_wer']:.2%}: {row['service']!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
