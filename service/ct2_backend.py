"""The `ct2` engine's batch decoder: CTranslate2 (the runtime under faster-whisper) running a
CTranslate2 Whisper model natively, int8 on CPU by default: batched encode, batched `generate`
with beam search (at temperature 0) or sampling (fallback temperatures), the no-speech
probability, and CTranslate2's own cross-attention alignment for word times."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ctranslate2
import numpy as np
import torch
from whisper import timing
from whisper.audio import N_SAMPLES
from whisper.tokenizer import Tokenizer, get_tokenizer

from . import memory
from .decoding import AudioEncoder, log_mel_batch
from .engine_align import words_from_path
from .torch_threads import use_engine_threads

SAMPLE_LEN = 224  # new tokens per window at most (whisper's sample_len)


class CT2LoadError(RuntimeError):
    pass


@dataclass
class CT2Row:
    tokens: list[int]
    sum_logprob: float
    no_speech_prob: float
    looped: bool = False
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)


def load_ct2(model_dir: str | os.PathLike[str], device: str = "cpu",
             compute_type: str = "default", threads: int = 0) -> ctranslate2.models.Whisper:
    path = Path(model_dir)
    if not (path / "model.bin").is_file():
        raise CT2LoadError(
            f"the ct2 engine needs a CTranslate2 Whisper model directory (with model.bin, "
            f"config.json, vocabulary), as faster-whisper uses; {path} is not one. Convert a "
            "Whisper model with ct2-transformers-converter, or use --engine torch for whisper "
            "names and .pt checkpoints")
    kind, index = (device.split(":") + ["0"])[:2] if device.startswith("cuda") else ("cpu", "0")
    try:
        return ctranslate2.models.Whisper(
            str(path), device=kind, device_index=int(index), compute_type=compute_type,
            intra_threads=threads or (os.cpu_count() or 1), inter_threads=1)
    except (RuntimeError, ValueError) as exc:
        raise CT2LoadError(f"CTranslate2 cannot load {path} ({compute_type} on {device}): "
                           f"{exc}") from exc


class CT2Backend:
    name = "ct2"

    def __init__(self, model_dir: str | os.PathLike[str], *, device: str = "cpu",
                 compute_type: str = "default", beam_size: int = 1, threads: int = 0) -> None:
        self.model_dir = str(model_dir)
        # the same weights as openai-whisper's encoder, where that runs faster (engines.py: CPU)
        self.encoder: AudioEncoder | None = None
        self.device = device
        self.compute_type = compute_type
        self.model = load_ct2(model_dir, device, compute_type, threads)
        self.beam_size = max(1, beam_size)
        self.full_beam_size = self.beam_size
        self.is_multilingual = bool(self.model.is_multilingual)
        self.num_languages = int(self.model.num_languages)
        self.n_mels = int(self.model.n_mels)
        self.text_ctx = 448
        self.default_batch_size = 32 if device.startswith("cuda") else 16  # torch_backend
        self.tokenizer: Tokenizer = get_tokenizer(
            self.is_multilingual, num_languages=self.num_languages,
            language="en" if self.is_multilingual else None, task="transcribe")
        tok = self.tokenizer
        suppress = set(tok.non_speech_tokens)
        for t in (tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm,
                  tok.no_speech, tok.no_timestamps):
            if t is not None:
                suppress.add(t)
        self.suppress = sorted(suppress)  # whisper's SuppressTokens("-1")

    def describe(self) -> str:
        encoder = "; encoder: openai-whisper fp32" if self.encoder is not None else ""
        return (f"CTranslate2 on {self.device} ({self.compute_type}, beam {self.beam_size}"
                f"{encoder})")

    def warm_up(self) -> None:
        features = self.encode([np.zeros(16000, dtype=np.float32)])
        self.model.generate(features, [list(self.tokenizer.sot_sequence)], max_length=8)

    def reduce_beam(self, reduced: bool) -> None:
        """The engine's "smaller beam" degradation step: half the beam while it is taken."""
        self.beam_size = max(1, self.full_beam_size // 2) if reduced else self.full_beam_size

    def on_worker_thread(self, threads: int | None) -> None:
        # CTranslate2 has its own thread pool (intra_threads); the encoder on CPU is torch's
        if self.encoder is not None:
            use_engine_threads(threads)

    def encode(self, audio: Sequence[np.ndarray],
               progress: Callable[[float], None] | None = None) -> ctranslate2.StorageView:
        if self.encoder is not None:
            # CTranslate2 decodes from encoder output as well as from log-mel input; the view
            # holds a reference to the array
            features = self.encoder.encode(audio, progress).numpy()
            return ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
        batch = np.zeros((len(audio), N_SAMPLES), dtype=np.float32)
        for i, a in enumerate(audio):
            batch[i, : min(len(a), N_SAMPLES)] = a[:N_SAMPLES]
        mel = log_mel_batch(torch.from_numpy(batch), self.n_mels).numpy()
        return self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)),
                                 to_cpu=self.device == "cpu")

    def _rows(self, features: ctranslate2.StorageView, rows: list[int]) -> ctranslate2.StorageView:
        if rows == list(range(features.shape[0])):
            return features
        array = np.asarray(features)
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(array[rows]))

    def detect_language(self, features: ctranslate2.StorageView, rows: list[int]) -> list[str]:
        if not rows:
            return []
        found = self.model.detect_language(self._rows(features, rows))
        return [best[0][0].strip("<|>") for best in found]

    def decode(self, features: ctranslate2.StorageView, initial: list[list[int]],
               temperatures: Sequence[float], *, sot_index: int,
               should_stop: Callable[[], bool], seeds: Sequence[int] | None = None,
               batch_invariant: bool = True, greedy: bool = False) -> list[CT2Row]:
        out: list[CT2Row | None] = [None] * len(initial)
        groups = [[i for i, t in enumerate(temperatures) if t == 0]]
        # a sampled row alone, after seeding CTranslate2's generator with its seed: what it
        # samples then depends on the row, not on the batch (fallback rows are few)
        groups += [[i] for i, t in enumerate(temperatures) if t > 0]
        for rows in groups:
            if not rows:
                continue
            temperature = temperatures[rows[0]]
            if temperature > 0:
                ctranslate2.set_random_seed(seeds[rows[0]] if seeds else 0)
                sampling = {"beam_size": 1, "sampling_topk": 0,
                            "sampling_temperature": temperature}
            else:
                sampling = {"beam_size": 1 if greedy else self.beam_size}
            results = self.model.generate(
                self._rows(features, rows), [initial[i] for i in rows],
                max_length=len(initial[rows[0]]) + SAMPLE_LEN, return_scores=True,
                return_no_speech_prob=True, suppress_blank=True, suppress_tokens=self.suppress,
                **sampling)
            for i, result in zip(rows, results, strict=True):
                tokens = [t for t in result.sequences_ids[0] if t != self.tokenizer.eot]
                # scores are length-normalised (length_penalty 1): back to the sum
                total = float(result.scores[0]) * max(len(tokens), 1)
                out[i] = CT2Row(tokens, total, float(result.no_speech_prob))
        return [row for row in out if row is not None]

    def align(self, features: ctranslate2.StorageView, index: int, row: CT2Row,
              text_tokens: list[int], num_frames: int,
              ) -> tuple[list[timing.WordTiming], list[float]]:
        result = self.model.align(self._rows(features, [index]),
                                  list(self.tokenizer.sot_sequence), [text_tokens],
                                  num_frames, median_filter_width=7)[0]
        path = np.asarray(result.alignments, dtype=np.int64).reshape(-1, 2)
        words = words_from_path(self.tokenizer, text_tokens, path[:, 0], path[:, 1])
        probs = list(result.text_token_probs)[:len(text_tokens)]
        return words, [float(np.log(max(p, 1e-10))) for p in probs]

    def is_out_of_memory(self, error: BaseException) -> bool:
        return "out of memory" in str(error).lower()

    def is_fatal(self, error: BaseException) -> bool:
        """CTranslate2 reports CUDA failures as RuntimeError('CUDA failed with error ...')."""
        text = str(error)
        return "out of memory" not in text.lower() and any(
            m in text for m in ("CUDA failed", "CUDA error", "cuBLAS failed"))

    def after_batch(self) -> None:
        if self.device == "cpu":
            memory.release_free_memory()

    def close(self) -> None:
        self.model.unload_model()
