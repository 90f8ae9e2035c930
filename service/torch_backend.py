"""The `torch` engine's batch decoder: openai-whisper's model (GPU or CPU) under our batched
decode loop (`decoding.BatchDecoder`) and whisper's cross-attention word alignment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import whisper
from whisper import timing
from whisper.audio import HOP_LENGTH
from whisper.tokenizer import Tokenizer, get_tokenizer

from . import memory
from .decoding import BatchDecoder, RowResult
from .engine_align import warm_up, word_timings
from .torch_threads import single_threaded, use_engine_threads

# a beam search decodes at most this many rows x beams at once (each has its own
# self-attention cache; a row's beams share its cross-attention state)
BEAM_ENTRIES = 32

# messages of CUDA errors after which the CUDA context is dead ("CUDA error: ..." covers the
# sticky ones: illegal memory access, device-side assert, unspecified launch failure, ECC)
_FATAL_CUDA = ("CUDA error", "CUBLAS_STATUS_EXECUTION_FAILED", "cuDNN error: CUDNN_STATUS_"
               "EXECUTION_FAILED", "CUDA driver error")


class TorchBackend:
    name = "torch"
    accepts_prefix = True  # forced tokens after the start sequence (Window.prefix)

    def __init__(self, model: whisper.model.Whisper, beam_size: int = 1) -> None:
        self.model = model
        self.beam_size = max(1, beam_size)  # at temperature 0; 1: greedy
        self._reduced = False
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.is_multilingual = bool(model.is_multilingual)
        self.num_languages = model.num_languages
        self.text_ctx = model.dims.n_text_ctx
        # CPU: 16, as a long file fills every batch and a batch's cross-attention state is
        # the server's peak memory (32 decode faster per row but peak higher)
        self.default_batch_size = 32 if self.cuda else 16
        self.tokenizer: Tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages,
            language="en" if model.is_multilingual else None, task="transcribe")
        with single_threaded():  # on the constructing thread: see torch_threads
            self.decoder = BatchDecoder(model, self.tokenizer, self.dtype)

    def describe(self) -> str:
        search = f", beam {self.beam_size}" if self.beam_size > 1 else ", greedy"
        return (f"openai-whisper on {self.device} ({str(self.dtype).removeprefix('torch.')}"
                f"{search})")

    def warm_up(self) -> None:
        """Before SERVING: the first job should be as fast as the second. One small batch
        through the encoder and the decode loop builds the kernels' primitives for these
        shapes; the word alignment runs once (its DTW kernel compiled or loaded)."""
        warm_up()
        tok = self.tokenizer
        rng = np.random.default_rng(0)
        audio = [(0.01 * rng.standard_normal(30 * 16000)).astype(np.float32)] * 2
        features = self.encode(audio)
        rows = self.decoder.decode(features, torch.tensor([list(tok.sot_sequence)] * 2),
                                   [0.0, 0.0], sot_index=0, should_stop=lambda: False)
        self.align(features, 0, rows[0], tok.encode(" Warming up the word alignment."),
                   len(audio[0]) // HOP_LENGTH)

    def on_worker_thread(self, threads: int | None) -> None:
        if self.cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)  # whisper's kernels run on the current device
        use_engine_threads(threads)

    def encode(self, audio: Sequence[np.ndarray],
               progress: Callable[[float], None] | None = None) -> torch.Tensor:
        features = self.decoder.encode(audio, progress)
        if self.cuda:
            torch.cuda.synchronize(self.device)  # so that encode time is the encoder's
        return features

    def detect_language(self, features: torch.Tensor, rows: list[int]) -> list[str]:
        return self.decoder.detect_language(features[rows]) if rows else []

    def reduce_beam(self, reduced: bool) -> None:
        """The engine's "smaller beam" degradation step: half the beam while it lasts."""
        self._reduced = reduced

    @property
    def active_beam(self) -> int:
        return max(1, self.beam_size // 2) if self._reduced else self.beam_size

    def decode(self, features: torch.Tensor, initial: list[list[int]],
               temperatures: Sequence[float], *, sot_index: int,
               should_stop: Callable[[], bool], seeds: Sequence[int] | None = None,
               batch_invariant: bool = True, greedy: bool = False) -> list[RowResult]:
        beam = 1 if greedy else self.active_beam
        rows_at_zero = [i for i, t in enumerate(temperatures) if t == 0]
        if beam <= 1 or not rows_at_zero:
            return self.decoder.decode(features, torch.tensor(initial), temperatures,
                                       sot_index=sot_index, should_stop=should_stop,
                                       seeds=seeds, batch_invariant=batch_invariant)
        # rows at temperature 0 by beam search (a few rows at a time: each carries `beam`
        # self-attention caches), fallback rows sampled as ever
        out: list[RowResult | None] = [None] * len(initial)
        per_call = max(1, BEAM_ENTRIES // beam)
        for s in range(0, len(rows_at_zero), per_call):
            rows = rows_at_zero[s:s + per_call]
            done = self.decoder.decode_beam(
                features[rows], torch.tensor([initial[i] for i in rows]), beam,
                sot_index=sot_index, should_stop=should_stop, batch_invariant=batch_invariant)
            for i, row in zip(rows, done, strict=True):
                out[i] = row
        sampled = [i for i, t in enumerate(temperatures) if t != 0]
        if sampled:
            done = self.decoder.decode(
                features[sampled], torch.tensor([initial[i] for i in sampled]),
                [temperatures[i] for i in sampled], sot_index=sot_index,
                should_stop=should_stop, seeds=[seeds[i] for i in sampled] if seeds else None,
                batch_invariant=batch_invariant)
            for i, row in zip(sampled, done, strict=True):
                out[i] = row
        return [row for row in out if row is not None]

    def align(self, features: torch.Tensor, index: int, row: RowResult, text_tokens: list[int],
              num_frames: int) -> tuple[list[timing.WordTiming], list[float]]:
        """Words (start/end in seconds from the row's audio start) and the log-probability of
        each text token in the decode."""
        eot = self.tokenizer.eot
        text_lp = [lp for t, lp in zip(row.tokens, row.token_logprobs, strict=False) if t < eot]
        words = word_timings(self.model, self.tokenizer, features[index], text_tokens,
                             num_frames, row.cross(features.dtype))
        return words, text_lp

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, torch.cuda.OutOfMemoryError)

    def is_fatal(self, error: BaseException) -> bool:
        """A CUDA error other than out-of-memory (illegal access, device-side assert, launch
        failure, ECC): the context is unusable for the rest of the process."""
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return False
        accelerator = getattr(torch, "AcceleratorError", None)
        if accelerator is not None and isinstance(error, accelerator):
            return True
        text = str(error)
        return isinstance(error, RuntimeError) and any(m in text for m in _FATAL_CUDA)

    def after_batch(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
        else:
            # glibc: hand the batch's freed heap pages back; a no-op under jemalloc
            memory.release_free_memory()

    def close(self) -> None:
        pass


def as_backend(model_or_backend: Any) -> Any:
    """A whisper model becomes a TorchBackend; a backend is returned as it is."""
    if isinstance(model_or_backend, whisper.model.Whisper):
        return TorchBackend(model_or_backend)
    return model_or_backend
