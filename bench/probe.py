"""Engine configurations side by side in one process, interleaved, on the 10-minute LJSpeech
tile of `make bench` (segmented once), with faster-whisper's batched pipeline as the peer.

    python -m bench.probe [--minutes 10] [--rounds 2] [--sides fw torch ct2:int8:5 ...]
        [--beam-size N] [--timestamps tokens|words]

A side: `fw` (faster-whisper BatchedInferencePipeline, int8, batch 16, beam 5), `vad` (the
silero segmentation alone), `torch`, `ct2:COMPUTE_TYPE:BEAM` (the ct2 engine as the server runs
it on CPU: our encoder, CTranslate2's decoder) or `ct2own:COMPUTE_TYPE:BEAM` (CTranslate2
encodes too); suffixes on an engine side:
`@N` batch size N, `%F` windows cut with the segmenter's fill_fraction F, `+vad` segments while
the engine runs (as the server does) instead of using the windows cut beforehand. `--trace`
prints each backend call. cpu_s is the process's CPU time: on a shared, busy machine it moves
less than wall_s. Engine sides get the windows cut once (vad_s, after the segmenter's warm-up,
is reported apart: in the server it overlaps the engine). Prints per side and round: wall s,
CPU s, whole-tile WER, the engine's stats delta.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def chunks(audio: np.ndarray, size: int = 480000) -> Any:
    for i in range(0, len(audio), size):
        yield SimpleNamespace(start_sample=i, samples=audio[i:i + size])


def base(side: str) -> str:
    """The engine a side runs on (its window variants stripped)."""
    return side.removesuffix("+vad").split("%")[0]


def make_engine(side: str, batch: int, beam: int = 0, timestamps: str = "tokens") -> Any:
    from longscribe.service.engine import Engine

    if "@" in side:  # side@N: batch size N
        side, size = side.split("@")
        batch = int(size)
    if side == "torch":
        from longscribe.service.models import load_model
        from longscribe.service.torch_backend import TorchBackend

        return Engine(TorchBackend(load_model(), beam_size=beam), batch_size=batch or None,
                      timestamp_tokens=timestamps == "tokens")
    kind, compute, beam = side.split(":")
    from longscribe.service.ct2_backend import CT2Backend
    from longscribe.service.engines import cpu_encoder
    from longscribe.service.models import default_model_dir

    backend = CT2Backend(default_model_dir(), compute_type=compute, beam_size=int(beam))
    if kind != "ct2own":  # ct2own: CTranslate2 encodes too
        backend.encoder = cpu_encoder(default_model_dir())  # as the server runs it on CPU
    return Engine(backend, batch_size=batch or None, timestamp_tokens=timestamps == "tokens")


def trace(backend: Any) -> None:
    """Print each backend call's rows and seconds (encode, decode, align summed per batch)."""
    log: dict[str, float] = {"align_s": 0.0, "aligns": 0}

    def wrap(name: str) -> None:
        inner = getattr(backend, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = inner(*a, **k)
            dt = time.perf_counter() - t
            if name == "align":
                log["align_s"] += dt
                log["aligns"] += 1
            else:
                if name == "encode" and log["aligns"]:
                    print(f"  align x{log['aligns']:.0f} {log['align_s']:.2f}s", flush=True)
                    log["align_s"], log["aligns"] = 0.0, 0
                rows = len(a[0]) if name == "encode" else len(a[1])
                print(f"  {name} rows={rows} {dt:.2f}s", flush=True)
            return out

        setattr(backend, name, timed)

    for name in ("encode", "decode", "align"):
        wrap(name)


def main() -> None:
    import whisper
    from longscribe.service import segment
    from longscribe.service.engine import DecodeOptions, transcript_text
    from longscribe.service.segment import Segmenter

    from bench.run import LJ, TILE_GAP, _tiled_reference, tile
    from tests.conftest import wer

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--sides", nargs="+", default=["fw", "torch", "ct2:int8:5"])
    ap.add_argument("--beam-size", type=int, default=0, help="the torch sides' beam (0: greedy)")
    ap.add_argument("--timestamps", choices=("tokens", "words"), default="tokens",
                    help="engine sides: timestamp tokens, or text only (serve --timestamps)")
    ap.add_argument("--trace", action="store_true", help="per-batch backend timings")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "tile.flac"
        duration = tile(LJ, args.minutes, path)
        audio = whisper.load_audio(str(path))
    one = whisper.load_audio(str(LJ)).shape[0] / 16000 + TILE_GAP
    reference = _tiled_reference(duration, one)
    segment.warm_up()  # TorchScript's profiling runs, as the server does before SERVING
    t = time.perf_counter()
    windows = list(Segmenter("silero").windows(chunks(audio)))
    vad_s = time.perf_counter() - t
    print(json.dumps({"duration": round(duration, 1), "windows": len(windows),
                      "vad_s": round(vad_s, 2), "threads": os.cpu_count()}), flush=True)
    engines: dict[str, Any] = {}
    fw = None
    for side in args.sides:
        if side == "fw":
            from faster_whisper import BatchedInferencePipeline, WhisperModel
            from longscribe.service.models import default_model_dir

            fw = BatchedInferencePipeline(WhisperModel(
                str(default_model_dir()), device="cpu", compute_type="int8",
                cpu_threads=os.cpu_count() or 0))
            list(fw.transcribe(audio[:16000 * 60], batch_size=16, beam_size=5)[0])
        elif side != "vad" and base(side) not in engines:
            engines[base(side)] = make_engine(base(side), args.batch, args.beam_size,
                                              args.timestamps)
            engines[base(side)].start()
            if args.trace:
                trace(engines[base(side)].backend)
    for r in range(args.rounds):
        for side in args.sides:
            row: dict[str, Any] = {"side": side, "round": r}
            t, c = time.perf_counter(), time.process_time()
            if side == "fw":
                assert fw is not None
                segs = list(fw.transcribe(audio, batch_size=16, beam_size=5)[0])
                text = " ".join(s.text for s in segs)
            elif side == "vad":
                list(Segmenter("silero").windows(chunks(audio)))
                text = ""
            else:
                eng = engines[base(side)]
                before = vars(eng.stats_snapshot())
                # "+vad": the segmenter runs as the engine pulls windows, as in the server
                source = (Segmenter("silero").windows(chunks(audio)) if side.endswith("+vad")
                          else windows)
                if "%" in side:  # side%F: windows cut with the segmenter's fill_fraction F
                    fill = float(side.split("%")[1])
                    source = list(Segmenter("silero", fill_fraction=fill).windows(chunks(audio)))
                res = list(eng.transcribe(source, DecodeOptions(), threading.Event()))
                text = transcript_text(res)
                after = vars(eng.stats_snapshot())
                row["stats"] = {k: round(after[k] - before[k], 2) for k in after}
            row["wall_s"] = round(time.perf_counter() - t, 2)
            row["cpu_s"] = round(time.process_time() - c, 2)
            if text:
                row["wer"] = round(100 * wer(reference, text), 2)
            print(json.dumps(row), flush=True)
    for eng in engines.values():
        eng.stop()


if __name__ == "__main__":
    main()
