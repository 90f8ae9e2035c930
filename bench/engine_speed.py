"""Engine vs openai-whisper transcribe(), back to back in one process, on the LJSpeech file.

    .venv/bin/python bench/engine_speed.py [--tile 3] [--threads 2] [--batch 8] [--repeat 1]
        [--skip-baseline] [--segmenter silero|energy] [--mix]

--mix: a hard long-form mix (utterances, telephone-band/low-bitrate and sped-up clips, noise,
a tone, a 60 s silence) instead of the LJSpeech reading. Prints wall seconds, x real time and
WER (whisper's EnglishTextNormalizer + jiwer) per side, and the speed ratio. The gRPC end-to-end
benchmark (`make bench`) is separate; this one isolates the engine (segmentation + batched
decoding) from fetching, decoding and the RPC layer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
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
from longscribe.service.torch_backend import TorchBackend
from whisper.normalizers import EnglishTextNormalizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
LJ = "ljspeech_LJ001-0001_to_0032"


def wer(reference: str, hypothesis: str) -> float:
    norm = EnglishTextNormalizer()
    return jiwer.wer(norm(reference), norm(hypothesis))


def chunks(audio: np.ndarray, size: int = 480000):
    for i in range(0, len(audio), size):
        yield SimpleNamespace(start_sample=i, samples=audio[i:i + size])


def hard_mix(data: Path, work: Path) -> tuple[np.ndarray, str]:
    """Real utterances joined with silences, noise and a tone; one clip telephone-band at a low
    mp3 bitrate, one sped up; a 60 s silence. Returns (16 kHz audio, reference text)."""
    refs = dict(line.split("\t", 1) for line in (data / "refs.tsv").read_text().splitlines())
    names = sorted(refs)
    rng = np.random.default_rng(0)

    def load(name: str, *ffmpeg_args: str) -> np.ndarray:
        if not ffmpeg_args:
            return whisper.audio.load_audio(str(data / name))
        out = work / f"{name}.{len(ffmpeg_args)}.mp3"
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(data / name),
                        *ffmpeg_args, str(out)], check=True)
        return whisper.audio.load_audio(str(out))

    def quiet(sec: float) -> np.ndarray:
        return np.zeros(int(sec * 16000), dtype=np.float32)

    t = np.arange(5 * 16000) / 16000
    parts = [
        (load(names[0]), refs[names[0]]), (quiet(1.0), ""),
        (load(names[1], "-ar", "8000", "-b:a", "16k"), refs[names[1]]),
        ((0.05 * rng.standard_normal(10 * 16000)).astype(np.float32), ""),
        (load(names[2], "-filter:a", "atempo=1.25", "-b:a", "32k"), refs[names[2]]),
        ((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), ""),
        (load("jfk.flac"), (data / "jfk.txt").read_text()), (quiet(60), ""),
        (load(names[3]), refs[names[3]]), (quiet(0.5), ""),
        (load(names[4]), refs[names[4]]), (quiet(0.5), ""), (load(names[5]), refs[names[5]]),
    ]
    return np.concatenate([a for a, _ in parts]), " ".join(r for _, r in parts if r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=1, help="repeat the LJSpeech file this many times")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--batch", type=int, default=0, help="engine batch size (0: default)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--segmenter", default="silero")
    ap.add_argument("--beam-size", type=int, default=1, help="torch engine beam (1: greedy)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--mix", action="store_true", help="the hard mix instead of LJSpeech")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    if args.mix:
        with tempfile.TemporaryDirectory() as work:
            one, text = hard_mix(args.data, Path(work))
    else:
        one = whisper.audio.load_audio(str(args.data / f"{LJ}.flac"))
        text = (args.data / f"{LJ}.txt").read_text()
    gap = np.zeros(int(0.4 * 16000), dtype=np.float32)
    audio = np.concatenate([np.concatenate([one, gap])] * (args.tile - 1) + [one])
    reference = " ".join([text] * args.tile)
    seconds = len(audio) / 16000
    fp16 = torch.cuda.is_available()
    out: dict[str, object] = {"audio_seconds": round(seconds, 1),
                              "threads": torch.get_num_threads()}
    backend = TorchBackend(model, beam_size=args.beam_size)
    engine = Engine(backend, batch_size=args.batch or None, threads=args.threads or None)
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
