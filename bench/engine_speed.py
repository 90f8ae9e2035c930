"""Engine vs openai-whisper transcribe(), back to back in one process, on the LJSpeech file.

    .venv/bin/python bench/engine_speed.py [--tile 3] [--threads 2] [--batch 8] [--repeat 1]
        [--skip-baseline] [--segmenter silero|energy]

Prints wall seconds, x real time and WER (whisper's EnglishTextNormalizer + jiwer) per side, and
the speed ratio. The gRPC end-to-end benchmark (`make bench`) is separate; this one isolates the
engine (segmentation + batched decoding) from fetching, decoding and the RPC layer.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jiwer
import numpy as np
import torch
import whisper
from longscribe.service.engine import DecodeOptions, Engine, transcript_text
from longscribe.service.models import load_model
from longscribe.service.segment import Segmenter
from whisper.normalizers import EnglishTextNormalizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
LJ = "ljspeech_LJ001-0001_to_0032"


def wer(reference: str, hypothesis: str) -> float:
    norm = EnglishTextNormalizer()
    return jiwer.wer(norm(reference), norm(hypothesis))


def chunks(audio: np.ndarray, size: int = 480000):
    for i in range(0, len(audio), size):
        yield SimpleNamespace(start_sample=i, samples=audio[i:i + size])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=1, help="repeat the LJSpeech file this many times")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--batch", type=int, default=0, help="engine batch size (0: default)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--segmenter", default="silero")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    one = whisper.audio.load_audio(str(args.data / f"{LJ}.flac"))
    gap = np.zeros(int(0.4 * 16000), dtype=np.float32)
    audio = np.concatenate([np.concatenate([one, gap])] * (args.tile - 1) + [one])
    reference = " ".join([(args.data / f"{LJ}.txt").read_text()] * args.tile)
    seconds = len(audio) / 16000
    fp16 = torch.cuda.is_available()
    out: dict[str, object] = {"audio_seconds": round(seconds, 1),
                              "threads": torch.get_num_threads()}
    engine = Engine(model, batch_size=args.batch or None, threads=args.threads or None)
    engine.start()
    for rep in range(args.repeat):
        if not args.skip_baseline:
            t, c = time.perf_counter(), time.process_time()
            text = model.transcribe(audio, fp16=fp16)["text"]
            dt = time.perf_counter() - t
            out[f"baseline_{rep}"] = {"wall_s": round(dt, 2), "xrt": round(seconds / dt, 1),
                                      "cpu_s": round(time.process_time() - c, 2),
                                      "wer": round(wer(reference, text), 4)}
        t, c = time.perf_counter(), time.process_time()
        windows = Segmenter(args.segmenter).windows(chunks(audio))
        results = list(engine.transcribe(windows, DecodeOptions(), threading.Event()))
        dt = time.perf_counter() - t
        out[f"engine_{rep}"] = {"wall_s": round(dt, 2), "xrt": round(seconds / dt, 1),
                                "cpu_s": round(time.process_time() - c, 2),
                                "wer": round(wer(reference, transcript_text(results)), 4),
                                "windows": len(results)}
        if not args.skip_baseline:
            out[f"speedup_{rep}"] = round(out[f"baseline_{rep}"]["wall_s"] / dt, 2)
        print(json.dumps(out), flush=True)
    out["stats"] = vars(engine.stats_snapshot())
    engine.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
