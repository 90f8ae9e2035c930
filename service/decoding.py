"""Batched Whisper decoding with a static key/value cache.

`BatchDecoder` runs openai-whisper's model (its weights, tokenizer and log-mel) but its own decode
loop: the encoder once per batch, cross-attention keys/values once per batch, a preallocated
self-attention cache written in place (no hooks, no torch.cat per step), whisper's logit rules
(SuppressBlank, SuppressTokens, ApplyTimestampRules) vectorised over the batch, per-row
temperature, and rows that finish are dropped from the batch. The result per row matches what
`whisper.decode()` would give for the same window at the same temperature.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import HOP_LENGTH, N_FFT, N_SAMPLES, mel_filters
from whisper.tokenizer import Tokenizer

TIME_PRECISION = 0.02  # seconds per timestamp token (30 s / 1500)
SAMPLES_PER_TOKEN = 320  # 0.02 s at 16 kHz
ENCODE_SLICE_CPU = 4  # windows per encoder pass on CPU (bounds its activations)
ENCODER_BF16 = True  # CPU encoder matmuls under bf16 autocast (where the CPU has bf16 units)


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates
    it and a bf16 tensor costs more to read than an fp32 one."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def cpu_has_amx() -> bool:
    """Matrix units: the decoder's per-step vocabulary scores pay in bf16 only with these (with
    AVX512-BF16 alone its one-row-per-window bf16 products ran slower than fp32). The
    encoder's large ones pay with either (AMD EPYC, AVX512-BF16: 0.57 against 0.98 s per 4
    windows)."""
    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())

# CPU: MKL's fp32 matmul takes a different kernel (another summation order) for a matrix of
# fewer than 4 rows, and again under 16: a row's logits, and so its greedy tokens and the
# log-probabilities that decide fallback, depended on how many rows shared its batch (measured
# on tiny.en: the same window's sum log-probability moved by up to 0.01 between batches of 1,
# 2-3 and 4+). Every decoder matmul runs on at least this many rows (zero rows padded), where a
# row's result no longer depends on the other rows or its place among them.
BATCH_INVARIANT_ROWS = 16
RESCORE = 16  # text and timestamp candidates per row rescored in fp32 after approximate logits
APPROXIMATE_MIN_ROWS = 8  # unpadded batches (live rows) of fewer rows score the vocabulary exactly
# A step's q @ k reads the self-attention cache's keys up to a multiple of this many positions
# (the scores past the sequence are dropped): over an odd number of cached positions the CPU's
# batched matmul (and the fused attention kernel) gave a row's scores in another rounding at
# odd places of its batch, so a window's log-probabilities depended on where it sat.
KEY_ALIGN = 16


def compression_ratio(text: str) -> float:
    """gzip ratio as whisper computes it (high = repetitive)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def log_mel_batch(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """whisper.log_mel_spectrogram for a (B, N_SAMPLES) batch, normalised per row (whisper's own
    function takes the max over the whole batch)."""
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel = mel_filters(audio.device, n_mels) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


@dataclass
class RowResult:
    """One decoded row: sampled tokens (no sot prefix, no eot) and whisper's quality numbers."""

    tokens: list[int]
    sum_logprob: float
    no_speech_prob: float
    looped: bool  # stopped early by the repetition guard
    # the batch's cross-attention keys and values per decoder layer, shared by its rows, and
    # this row's index in them: the word alignment reuses them instead of projecting again
    batch_cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    index: int = 0
    token_logprobs: list[float] = field(default_factory=list)  # one per token, same order

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)

    def cross(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """This row's keys and values as whisper's kv_cache holds them, (1, 1500, d) each.
        Copied on demand, one row at a time, so a batch never holds its cross state twice."""
        if self.batch_cross is None:
            return None
        i = self.index
        return [(k[i].permute(2, 0, 1).reshape(1, k.shape[3], -1).to(dtype),
                 v[i].transpose(0, 1).reshape(1, v.shape[2], -1).to(dtype))
                for k, v in self.batch_cross]


@dataclass
class _StepBuffers:
    """Per-batch scratch for the (rows, vocab) tensors of every decode step: allocated once per
    batch, not once per step (each is a few MB, large enough that malloc maps and unmaps it)."""

    logits: torch.Tensor  # fp32
    scratch: torch.Tensor  # fp32
    low: torch.Tensor  # bf16 logits before rescoring (empty where unused)

    min_rows: int = 1  # the sum runs over at least this many rows (BATCH_INVARIANT_ROWS)

    @classmethod
    def allocate(cls, rows: int, vocab: int, device: torch.device, *, low: bool,
                 min_rows: int = 1) -> _StepBuffers:
        return cls(torch.empty(rows, vocab, device=device),
                   torch.zeros(max(rows, min_rows), vocab, device=device),
                   torch.empty(rows if low else 0, vocab, dtype=torch.bfloat16, device=device),
                   min_rows)

    def logsumexp(self, logits: torch.Tensor) -> torch.Tensor:
        """Row-wise logsumexp of finite-max logits, through the scratch buffer. The sum over
        the vocabulary runs on at least `min_rows` rows: a single row's sum is split across
        threads (another summation order than the same row's among several)."""
        n = logits.shape[0]
        top = logits.amax(dim=-1, keepdim=True)
        torch.sub(logits, top, out=self.scratch[:n])
        if n < self.min_rows:
            self.scratch[n:self.min_rows].zero_()  # padding rows (an earlier step's values)
        shifted = self.scratch[:max(n, self.min_rows)]
        return shifted.exp_().sum(dim=-1)[:n].log_() + top.squeeze(1)


@dataclass(frozen=True)
class _Int8Matrix:
    """A (d, n) fp32 matrix as int8 with a scale per column, multiplied by rows quantised to
    int8 with a scale per row (symmetric, round to nearest): x @ m to about 1 % of its range."""

    values: torch.Tensor  # (d, n) int8
    scale: torch.Tensor  # (n,) fp32

    @classmethod
    def of(cls, m: torch.Tensor) -> _Int8Matrix:
        scale = m.abs().amax(dim=0).clamp(min=1e-12) / 127
        return cls(torch.round(m / scale).to(torch.int8).contiguous(), scale.float())

    def matmul(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x.float()
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.round(x / row_scale).to(torch.int8)
        torch.mul(torch._int_mm(xq, self.values), self.scale, out=out)
        return out.mul_(row_scale)


class _Layer:
    """One decoder block's weights in the compute dtype, as plain tensors."""

    def __init__(self, block: torch.nn.Module, dtype: torch.dtype) -> None:
        def w(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        a, c = block.attn, block.cross_attn
        # layer norms compute in fp32 whatever the model dtype: their weights are held in fp32
        # once, not cast on every call (fp16 on CUDA)
        self.ln1 = _fp32(block.attn_ln)
        self.qkv_w = torch.cat([a.query.weight, a.key.weight, a.value.weight]).detach().to(dtype)
        zeros = torch.zeros_like(a.query.bias)
        self.qkv_b = torch.cat([a.query.bias, zeros, a.value.bias]).detach().to(dtype)
        self.out = (w(a.out.weight), w(a.out.bias))
        self.ln2 = _fp32(block.cross_attn_ln)
        self.cq = (w(c.query.weight), w(c.query.bias))
        self.ck = w(c.key.weight)
        self.cv = (w(c.value.weight), w(c.value.bias))
        self.cout = (w(c.out.weight), w(c.out.bias))
        self.ln3 = _fp32(block.mlp_ln)
        self.fc1 = (w(block.mlp[0].weight), w(block.mlp[0].bias))
        self.fc2 = (w(block.mlp[2].weight), w(block.mlp[2].bias))


def _fp32(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.weight.detach().float(), norm.bias.detach().float()


def _ln(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # whisper's LayerNorm computes in float32 whatever the model dtype (weights: _fp32)
    return F.layer_norm(x.float(), (x.shape[-1],), wb[0], wb[1]).to(x.dtype)


def _without_autocast(blocks_done: Callable[[float], None]) -> Callable[[float], None]:
    """The engine's safe point between encoder blocks may run a whole preempting batch: it
    must not inherit the encoder's bf16 autocast (its decoder would run in bf16, and the same
    window would decode differently when it preempts another batch)."""
    def outside(fraction: float) -> None:
        with torch.autocast("cpu", enabled=False):
            blocks_done(fraction)

    return outside


class AudioEncoder:
    """Whisper's log-mel and audio encoder over a batch of windows (also the ct2 engine's
    encoder on CPU, where it runs faster than CTranslate2's own)."""

    def __init__(self, model: whisper.model.Whisper, dtype: torch.dtype, *,
                 bf16: bool = False) -> None:
        self.model = model
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.bf16 = bf16

    @torch.inference_mode()
    def encode(self, audio: Sequence[np.ndarray],
               progress: Callable[[float], None] | None = None) -> torch.Tensor:
        """Windows (each ≤ 30 s of 16 kHz float32) → audio features (B, 1500, d).
        `progress(fraction)` after each encoder block of each slice: the engine's safe points,
        where a live final need not wait for a whole encoder pass (~0.3 s for one CPU row)."""
        # On CPU the encoder runs a few windows at a time: its matmuls are already large enough
        # at that size, and its activations (hundreds of MB for a whole batch) stay small.
        step = len(audio) if self.device.type == "cuda" else ENCODE_SLICE_CPU
        out: torch.Tensor | None = None
        for start in range(0, len(audio), step):
            size = min(step, len(audio) - start)

            def blocks_done(fraction: float, start: int = start, size: int = size) -> None:
                if progress is not None:
                    progress((start + fraction * size) / len(audio))

            part = self._encode(audio[start:start + step], blocks_done)
            if out is None:
                out = part.new_empty((len(audio), *part.shape[1:]))
            out[start:start + len(part)] = part
        assert out is not None, "encode() needs at least one window"
        return out

    def _encode(self, audio: Sequence[np.ndarray],
                blocks_done: Callable[[float], None]) -> torch.Tensor:
        batch = np.zeros((len(audio), N_SAMPLES), dtype=np.float32)
        for i, a in enumerate(audio):
            batch[i, : min(len(a), N_SAMPLES)] = a[:N_SAMPLES]
        x = torch.from_numpy(batch).to(self.device)
        mel = log_mel_batch(x, self.model.dims.n_mels).to(self.dtype)
        if self.bf16:
            # CPU with bf16 units: the encoder's matmuls in bf16; layer norms, softmax and the
            # residual stream stay fp32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._blocks(mel, _without_autocast(blocks_done)).float()
        return self._blocks(mel, blocks_done)

    def _blocks(self, mel: torch.Tensor, blocks_done: Callable[[float], None]) -> torch.Tensor:
        """whisper's AudioEncoder.forward, step for step, with a call after each block."""
        enc = self.model.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = (x + enc.positional_embedding).to(x.dtype)
        for i, block in enumerate(enc.blocks):
            x = block(x)
            blocks_done((i + 1) / len(enc.blocks))
        return enc.ln_post(x)


class BatchDecoder:
    """Greedy / sampled decoding of a batch of 30 s mel windows with timestamps."""

    def __init__(self, model: whisper.model.Whisper, tokenizer: Tokenizer, dtype: torch.dtype):
        self.model = model
        self.tok = tokenizer
        self.dtype = dtype
        self.device = next(model.parameters()).device
        dec = model.decoder
        self.n_head = model.dims.n_text_head
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = self.n_ctx // 2
        self.emb = dec.token_embedding.weight.detach().to(dtype)
        # The per-step vocabulary matmul (a third of a CPU decode step in fp32) is scored
        # approximately, then the RESCORE best text and timestamp candidates of each row are
        # rescored in fp32, so the choices and the probabilities that decide them are the fp32
        # ones: on a CPU with matrix units (AMX) in bf16 (half the bytes); elsewhere on CPU in
        # int8 (a quarter; integer products are exact, so a row's scores do not depend on the
        # other rows of its batch). With AVX512-BF16 alone, bf16 was slower than fp32.
        cpu32 = self.device.type == "cpu" and dtype == torch.float32
        self.emb_lp = (self.emb.T.contiguous().to(torch.bfloat16) if cpu32 and cpu_has_amx()
                       else None)
        self.emb_i8: _Int8Matrix | None = (
            _Int8Matrix.of(self.emb.T) if cpu32 and self.emb_lp is None else None)
        # exact logits (every step on GPU, the first step's no-speech probability on CPU), as
        # F.linear takes them; stored (d, vocab) on GPU, the CPU reads the embedding as it is
        self.logit_weight = self.emb if self.approximate else self.emb.T.contiguous().T
        self.encoder = AudioEncoder(model, dtype,
                                    bf16=cpu32 and cpu_has_bf16() and ENCODER_BF16)
        # The cross-attention keys and values of a CPU batch (~18 MB a row at fp32, the
        # batch's largest state) in bf16 where the CPU has bf16 units: half the memory and the
        # bandwidth; the softmax over the scores stays fp32. One bf16 stage at most: after a
        # bf16 encoder they stay fp32 (the two roundings together changed words that either
        # alone left as fp32 decodes them).
        self.cross_dtype = (torch.bfloat16 if self.device.type == "cpu" and dtype == torch.float32
                            and cpu_has_bf16() and not self.encoder.bf16 else dtype)
        self.scale = (model.dims.n_text_state // model.dims.n_text_head) ** -0.5
        self.min_rows = BATCH_INVARIANT_ROWS if self.device.type == "cpu" else 1
        self.pos = dec.positional_embedding.detach().to(dtype)
        self.ln = _fp32(dec.ln)
        self.layers = [_Layer(b, dtype) for b in dec.blocks]
        self.ts_begin = tokenizer.timestamp_begin
        self.eot = tokenizer.eot
        vocab = self.emb.shape[0]
        # SuppressTokens("-1") as whisper's default, plus the special tokens it always adds
        suppress = set(tokenizer.non_speech_tokens)
        for t in (tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                  tokenizer.sot_lm, tokenizer.no_speech, tokenizer.no_timestamps):
            if t is not None:
                suppress.add(t)
        self.suppress = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppress[sorted(suppress)] = True
        self.blank = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.blank[tokenizer.encode(" ") + [self.eot]] = True
        self.max_initial_ts = round(1.0 / TIME_PRECISION)  # whisper's max_initial_timestamp=1.0
        self.vocab_ids = torch.arange(vocab, device=self.device)

    @property
    def approximate(self) -> bool:
        """Whether decode steps score the vocabulary approximately (CPU; see __init__)."""
        return self.emb_lp is not None or self.emb_i8 is not None

    # --- encoder -----------------------------------------------------------------------------
    def encode(self, audio: Sequence[np.ndarray],
               progress: Callable[[float], None] | None = None) -> torch.Tensor:
        return self.encoder.encode(audio, progress)

    @torch.inference_mode()
    def detect_language(self, features: torch.Tensor) -> list[str]:
        tokens, _ = whisper.decoding.detect_language(self.model, features, self.tok)
        codes = dict(zip(self.tok.all_language_tokens, self.tok.all_language_codes, strict=False))
        return [codes[int(t)] for t in tokens.tolist()]

    # --- decoder -----------------------------------------------------------------------------
    def _attn(self, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor,
              causal: bool) -> torch.Tensor:
        """q (B,H,T,D); keys given transposed (B,H,D,S), as the caches store them. Cross-
        attention of a beam search: B = rows × beams queries over the rows' keys, each row's
        beams read its keys as more query positions (its cross state is held once, not per
        beam)."""
        if q.shape[0] != k_t.shape[0]:
            n = k_t.shape[0]
            g = q.shape[0] // n
            _, h, t, d = q.shape
            grouped = q.reshape(n, g, h, t, d).transpose(1, 2).reshape(n, h, g * t, d)
            out = self._attn_heads(grouped, k_t, v, causal=False)
            out = out.reshape(n, h, g, t, d).transpose(1, 2).reshape(n * g, h, t, d)
        else:
            out = self._attn_heads(q, k_t, v, causal)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)

    def _attn_heads(self, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor,
                    causal: bool) -> torch.Tensor:
        """Attention over the keys that have values: `k_t` may hold more positions than `v`
        (KEY_ALIGN), whose scores are dropped. Plain matmuls: for one query per row they beat
        the fused CPU kernel by ~10x, and with several (a prompt) it took another rounding at
        odd key counts."""
        s, t = v.shape[-2], q.shape[-2]
        w = (q.to(k_t.dtype) @ k_t)[..., :s].float() * self.scale
        if causal:  # query i sits at position s - t + i and sees the keys up to it
            future = torch.ones(t, s, dtype=torch.bool, device=w.device).triu_(s - t + 1)
            w = w.masked_fill_(future, float("-inf"))
        return (w.softmax(dim=-1).to(v.dtype) @ v).to(q.dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

    def _forward(self, tokens: torch.Tensor, offset: int, cache: list[list[torch.Tensor]],
                 cross: list[tuple[torch.Tensor, torch.Tensor]], min_rows: int) -> torch.Tensor:
        """tokens (B, T) at positions offset..offset+T-1 → hidden states (B, T, d) after ln."""
        t = tokens.shape[1]
        x = self.emb[tokens] + self.pos[offset:offset + t]
        for layer, kv, (ck, cv) in zip(self.layers, cache, cross, strict=True):
            h = _ln(x, layer.ln1)
            q, k, v = self._linear(h, layer.qkv_w, layer.qkv_b, min_rows).chunk(3, dim=-1)
            kv[0][:, :, :, offset:offset + t] = self._heads(k).transpose(-1, -2)
            kv[1][:, :, offset:offset + t] = self._heads(v)
            keys = min(-(-(offset + t) // KEY_ALIGN) * KEY_ALIGN, kv[0].shape[-1])
            a = self._attn(self._heads(q), kv[0][..., :keys], kv[1][:, :, :offset + t],
                           causal=t > 1)
            x = x + self._linear(a, *layer.out, min_rows)
            h = _ln(x, layer.ln2)
            a = self._attn(self._heads(self._linear(h, *layer.cq, min_rows)), ck, cv, causal=False)
            x = x + self._linear(a, *layer.cout, min_rows)
            h = _ln(x, layer.ln3)
            x = x + self._linear(F.gelu(self._linear(h, *layer.fc1, min_rows)), *layer.fc2,
                                 min_rows)
        return _ln(x, self.ln)

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                min_rows: int) -> torch.Tensor:
        """F.linear whose result for a row does not depend on the other rows (CPU): inputs of
        fewer than `min_rows` rows are padded with zero rows (see BATCH_INVARIANT_ROWS)."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= min_rows:
            return F.linear(x, weight, bias)
        padded = rows.new_zeros((min_rows, rows.shape[1]))
        padded[:rows.shape[0]] = rows
        out = F.linear(padded, weight, bias)[:rows.shape[0]]
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def _logits(self, hidden: torch.Tensor, min_rows: int) -> torch.Tensor:
        return self._linear(hidden, self.logit_weight, None, min_rows).float()

    def _step_logits(self, hidden: torch.Tensor, bufs: _StepBuffers,
                     approximate: bool) -> torch.Tensor:
        """Logits for a decode step: approximate on CPU (see __init__), exact rescoring later."""
        n = hidden.shape[0]
        if not approximate:
            return self._logits(hidden, bufs.min_rows)
        if self.emb_i8 is not None:
            return self.emb_i8.matmul(hidden, out=bufs.logits[:n])
        assert self.emb_lp is not None
        low = torch.matmul(hidden.to(torch.bfloat16), self.emb_lp, out=bufs.low[:n])
        return bufs.logits[:n].copy_(low)

    def _rescore(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """Overwrite the RESCORE best allowed text and timestamp logits of each row with their
        fp32 values (masked entries stay masked)."""
        tb = self.ts_begin
        k = RESCORE
        idx = torch.cat([logits[:, :tb].topk(k, dim=-1).indices,
                         logits[:, tb:].topk(k, dim=-1).indices + tb], dim=1)
        # an elementwise product and a short sum: the same for a row in any batch (a batched
        # matrix-vector product was not)
        exact = (self.emb[idx] * hidden.float()[:, None, :]).sum(dim=-1)
        approx = logits.gather(1, idx)
        logits.scatter_(1, idx, torch.where(torch.isfinite(approx), exact, approx))

    def _apply_rules(self, logits: torch.Tensor, step: int, last: torch.Tensor,
                     penult: torch.Tensor, ts_max: torch.Tensor,
                     hidden: torch.Tensor | None = None, prefixed: bool = False,
                     text_only: bool = False) -> None:
        """whisper's SuppressBlank, SuppressTokens and ApplyTimestampRules, for all rows at once.
        `prefixed`: the initial tokens end with a forced segment start and text, which the rules
        go on from (no initial-timestamp rule). `text_only`: the initial tokens hold
        <|notimestamps|>: no timestamp token may follow (whisper's without_timestamps)."""
        neg = float("-inf")
        tb = self.ts_begin
        if step == 0:
            logits.masked_fill_(self.blank, neg)
        logits.masked_fill_(self.suppress, neg)
        if text_only:
            logits[:, tb:] = neg
            if hidden is not None:
                self._rescore(logits, hidden)
            return
        if step > 0 or prefixed:
            # each rule touches only its columns, with a per-row mask broadcast over them: no
            # (rows, vocab) mask is built, and the timestamp rules read 1501 columns, not 51k
            last_ts = last >= tb
            pen_ts = (penult >= tb) if step > 1 or prefixed else torch.ones_like(last_ts)
            stamps = logits[:, tb:]
            stamps.masked_fill_((last_ts & pen_ts)[:, None], neg)
            logits[:, :self.eot].masked_fill_((last_ts & ~pen_ts)[:, None], neg)
            # timestamps never decrease; a segment has nonzero length
            bound = torch.where(last_ts & ~pen_ts, ts_max, ts_max + 1)
            bound = torch.where(ts_max >= 0, bound, torch.zeros_like(bound))
            stamps.masked_fill_(self.vocab_ids[None, tb:] < bound[:, None], neg)
        else:
            logits[:, :tb] = neg
            logits[:, tb + self.max_initial_ts + 1:] = neg
        if hidden is not None:
            self._rescore(logits, hidden)
        # whisper compares log-probabilities; their shared normaliser cancels out
        ts_lp = logits[:, tb:].logsumexp(dim=-1)
        text_lp = logits[:, :tb].max(dim=-1).values
        logits[:, :tb].masked_fill_((ts_lp > text_lp)[:, None], neg)

    def _text_only(self, initial: torch.Tensor) -> bool:
        """Whether the rows decode text without timestamp tokens (one mode per call)."""
        marked = (initial == self.tok.no_timestamps).any(dim=1)
        if bool(marked.any()) != bool(marked.all()):
            raise ValueError("rows of one decode must all have <|notimestamps|>, or none")
        return bool(marked.all())

    def _scratch(self, rows: int, l0: int, min_rows: int
                 ) -> tuple[int, list[list[torch.Tensor]], _StepBuffers]:
        """A decode's longest sequence, its self-attention cache per layer (keys stored
        transposed, (B, H, D, S), so the per-step q @ k needs no copy; values (B, H, S, D))
        and its per-step buffers."""
        max_len = min(self.n_ctx, l0 + self.sample_len)
        hd = self.emb.shape[1] // self.n_head
        # keys up to a multiple of KEY_ALIGN positions, zeros where nothing is cached yet
        key_len = -(-max_len // KEY_ALIGN) * KEY_ALIGN
        cache = [[torch.zeros(rows, self.n_head, hd, key_len, dtype=self.dtype,
                              device=self.device),
                  torch.empty(rows, self.n_head, max_len, hd, dtype=self.dtype,
                              device=self.device)]
                 for _ in self.layers]
        bufs = _StepBuffers.allocate(rows, self.emb.shape[0], self.device,
                                     low=self.emb_lp is not None, min_rows=min_rows)
        return max_len, cache, bufs

    @torch.inference_mode()
    def decode(
        self,
        features: torch.Tensor,
        initial: torch.Tensor,
        temperatures: Sequence[float],
        *,
        sot_index: int,
        loop_ratio: float | None = 3.0,
        should_stop: Callable[[], bool] | None = None,
        check_every: int = 8,
        seeds: Sequence[int] | None = None,
        batch_invariant: bool = True,
    ) -> list[RowResult]:
        """Decode every row of `features` (B, 1500, d) from `initial` tokens (B, L0), each at its
        own temperature, until every row has emitted eot or `sample_len` tokens. A row sampled
        at a temperature > 0 draws from its own generator seeded with `seeds[row]` (default 0):
        the same row and seed sample the same tokens in any batch. `batch_invariant=False`:
        no padding rows (a lone CPU row decodes in about half the time, but its
        log-probabilities may differ in the last digits from the same row in a bigger batch)."""
        n, l0 = initial.shape
        min_rows = self.min_rows if batch_invariant else 1
        # a batch-invariant row is always scored the same way; a few unpadded rows score
        # faster exactly (the candidates' rescoring costs more than the smaller matmul saves)
        approximate = self.approximate and (batch_invariant or n >= APPROXIMATE_MIN_ROWS)
        cpu = self.device.type == "cpu"
        dev = self.device
        max_len, cache, bufs = self._scratch(n, l0, min_rows)
        cross = self._cross_state(features)
        first_cross = cross
        slot = list(range(n))  # where each row's state lives in the batch tensors
        temps = torch.tensor(list(temperatures), dtype=torch.float32, device=dev)
        sampling = any(t > 0 for t in temperatures)
        generators = {i: torch.Generator(device=dev).manual_seed(seeds[i] if seeds else 0)
                      for i, t in enumerate(temperatures) if t > 0}
        rows = torch.arange(n, device=dev)  # original row of each live batch entry
        out_tokens = torch.full((n, self.sample_len), self.eot, dtype=torch.long, device=dev)
        sum_lp = torch.zeros(n, dtype=torch.float32, device=dev)
        token_lp = torch.zeros((n, self.sample_len), dtype=torch.float32, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        # timestamps among the initial tokens: those of a forced prefix (Window.prefix)
        ts_max = torch.where(initial >= self.ts_begin, initial, -1).max(dim=1).values.to(dev)
        prefixed = bool((ts_max >= 0).any())
        text_only = self._text_only(initial)
        last = initial[:, -1].to(dev)
        penult = initial[:, -2].to(dev) if l0 > 1 else last
        looped = [False] * n
        no_speech = torch.zeros(n)

        tokens_in = initial.to(dev)
        offset = 0
        for step in range(min(self.sample_len, max_len - l0)):
            hidden = self._forward(tokens_in, offset, cache, cross, min_rows)
            if step == 0:
                probs = self._logits(hidden[:, sot_index], min_rows).softmax(dim=-1)
                no_speech = probs[:, self.tok.no_speech].cpu()
            offset += tokens_in.shape[1]
            logits = self._step_logits(hidden[:, -1], bufs, approximate)
            self._apply_rules(logits, step, last, penult, ts_max,
                              hidden[:, -1] if approximate else None, prefixed, text_only)
            nxt = logits.argmax(dim=-1)
            if sampling:  # decided on the host once: no device sync per step
                nxt = self._sample(logits, nxt, temps, rows, generators)
            live = ~done[rows]
            chosen = logits.gather(1, nxt[:, None]).squeeze(1) - bufs.logsumexp(logits)
            sum_lp[rows] += chosen * live
            token_lp[rows, step] = chosen
            nxt = torch.where(live, nxt, torch.full_like(nxt, self.eot))
            out_tokens[rows, step] = nxt
            done[rows] |= nxt == self.eot
            is_ts = nxt >= self.ts_begin
            ts_max = torch.where(is_ts, nxt, ts_max)
            penult, last = last, nxt
            tokens_in = nxt[:, None]

            # a CPU can check each step at no cost (no device sync): a lone row stops on its eot
            # instead of running up to check_every - 1 more steps
            if (step + 1) % check_every and not (cpu and bool(done.all())):
                continue
            if should_stop is not None and should_stop():
                break
            if loop_ratio is not None and step + 1 >= 48:
                self._guard_loops(out_tokens, rows, done, step + 1, loop_ratio, looped)
            keep = ~done[rows]
            alive = int(keep.sum())
            if alive == 0:
                break
            # drop finished rows at every check (a finished row's cross state, read at every
            # step, costs more within a few steps than moving it once): swap the live ones to
            # the front of the batch tensors and go on with views of that front part. Nothing
            # is allocated (compacted copies held the batch's cross state 1.5 times over while
            # the decode ran on), and the finished rows' cross state stays intact for their
            # alignment.
            if alive < len(rows):
                order = _partition(keep.tolist(), [*cache, *cross], rows.tolist(), slot)
                idx = torch.tensor(order[:alive], device=dev)
                rows = rows[idx]
                cache = [[c[:alive] for c in kv] for kv in cache]
                cross = [(k[:alive], v[:alive]) for k, v in cross]
                ts_max, last, penult = ts_max[idx], last[idx], penult[idx]
                tokens_in = tokens_in[idx]

        results = []
        toks = out_tokens.cpu().tolist()
        lps = sum_lp.cpu().tolist()
        per_token = token_lp.cpu().tolist()
        for i in range(n):
            seq = toks[i]
            end = seq.index(self.eot) if self.eot in seq else len(seq)
            results.append(RowResult(seq[:end], lps[i], float(no_speech[i]), looped[i],
                                     first_cross, slot[i], per_token[i][:end]))
        return results

    @torch.inference_mode()
    def decode_beam(
        self,
        features: torch.Tensor,
        initial: torch.Tensor,
        beam_size: int,
        *,
        sot_index: int,
        should_stop: Callable[[], bool] | None = None,
        check_every: int = 8,
        batch_invariant: bool = True,
    ) -> list[RowResult]:
        """Beam search at temperature 0, as whisper.decode(beam_size=N, patience=1) does it:
        each step every beam's best N + 1 tokens are candidates, a row keeps its N best
        unfinished ones, and it is done once N sequences have ended; the finished sequence with
        the best mean token log-probability wins. A row's beams share its cross-attention state;
        their self-attention caches are reordered as beams take over other beams' prefixes."""
        n, l0 = initial.shape
        beams = beam_size
        entries = n * beams
        min_rows = self.min_rows if batch_invariant else 1
        approximate = self.approximate and (batch_invariant or entries >= APPROXIMATE_MIN_ROWS)
        dev = self.device
        max_len, cache, bufs = self._scratch(entries, l0, min_rows)
        cross = self._cross_state(features)
        start = initial.to(dev).repeat_interleave(beams, dim=0)
        ts_max = torch.where(start >= self.ts_begin, start, -1).max(dim=1).values
        prefixed = bool((ts_max >= 0).any())
        text_only = self._text_only(initial)
        last = start[:, -1]
        penult = start[:, -2] if l0 > 1 else last
        # at first every beam of a row is the same sequence: only the first one is expanded
        live = _Beams([0.0 if e % beams == 0 else float("-inf") for e in range(entries)],
                      [[] for _ in range(entries)], [[] for _ in range(entries)])
        finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(n)]
        no_speech = torch.zeros(n)
        tokens_in = start
        offset = 0
        for step in range(min(self.sample_len, max_len - l0)):
            hidden = self._forward(tokens_in, offset, cache, cross, min_rows)
            if step == 0:
                probs = self._logits(hidden[::beams, sot_index], min_rows).softmax(dim=-1)
                no_speech = probs[:, self.tok.no_speech].cpu()
            offset += tokens_in.shape[1]
            logits = self._step_logits(hidden[:, -1], bufs, approximate)
            self._apply_rules(logits, step, last, penult, ts_max,
                              hidden[:, -1] if approximate else None, prefixed, text_only)
            logprobs = logits - bufs.logsumexp(logits)[:, None]
            top_lp, top_tok = logprobs.topk(beams + 1, dim=-1)
            cand_lp, cand_tok = top_lp.cpu().tolist(), top_tok.cpu().tolist()
            source, chosen, live = live.step(cand_tok, cand_lp, beams, self.eot, finished)
            if all(len(f) >= beams for f in finished):
                break
            moved = [i for i in range(entries) if source[i] != i]
            if moved:  # beams that continue another beam's sequence take its cache
                dst = torch.tensor(moved, device=dev)
                src = torch.tensor([source[i] for i in moved], device=dev)
                for keys, values in cache:
                    keys[dst, :, :, :offset] = keys[src, :, :, :offset]
                    values[dst, :, :offset] = values[src, :, :offset]
                ts_max, last, penult = ts_max.clone(), last.clone(), penult.clone()
                ts_max[dst], last[dst], penult[dst] = ts_max[src], last[src], penult[src]
            nxt = torch.tensor(chosen, device=dev)
            ts_max = torch.where(nxt >= self.ts_begin, nxt, ts_max)
            penult, last = last, nxt
            tokens_in = nxt[:, None]
            if (step + 1) % check_every == 0 and should_stop is not None and should_stop():
                break
        results = []
        for r in range(n):
            # out of steps before `beams` sequences ended: the best live ones make up the rest
            unfinished = sorted(((live.score[e], live.seqs[e], live.lps[e])
                                 for e in range(r * beams, (r + 1) * beams)
                                 if live.score[e] > float("-inf")),
                                key=lambda o: o[0], reverse=True)
            options = finished[r] + unfinished[:max(0, beams - len(finished[r]))]
            # whisper's MaximumLikelihoodRanker (no length penalty): the best mean log-prob
            total, tokens, token_lps = max(options, key=lambda o: o[0] / max(len(o[1]), 1))
            results.append(RowResult(list(tokens), total, float(no_speech[r]), False, cross, r,
                                     list(token_lps)[:len(tokens)]))
        return results

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor, temps: torch.Tensor,
                rows: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
        """Rows at a temperature > 0 sample (Gumbel-max: argmax of logits / T minus the log of
        Exp(1) noise, the same distribution as softmax sampling) with noise from their own
        generator, one draw per step: what a row samples depends on it alone, not on the batch
        or on torch's global generator (a fallback decode gave different text per run)."""
        noise = torch.ones_like(logits)
        for entry, row in enumerate(rows.tolist()):
            if row in generators:
                noise[entry].exponential_(generator=generators[row])
        t = temps[rows]
        sampled = (logits / t.clamp(min=1e-5)[:, None] - noise.log()).argmax(dim=-1)
        return torch.where(t > 0, sampled, greedy)

    def _cross_state(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys (B, H, D, S) and values (B, H, S, D) per layer, in the cross
        dtype. On CPU projected a few rows at a time straight into the result, so the fp32
        projections of the whole batch (~75 MB per layer for 16 rows) never exist at once."""
        n = features.shape[0]
        frames, d = features.shape[1], features.shape[2]
        hd = d // self.n_head
        step = n if self.device.type == "cuda" else ENCODE_SLICE_CPU
        cross = []
        for layer in self.layers:
            ck = features.new_empty((n, self.n_head, hd, frames), dtype=self.cross_dtype)
            cv = features.new_empty((n, self.n_head, frames, hd), dtype=self.cross_dtype)
            for s in range(0, n, step):
                part = features[s:s + step]
                ck[s:s + step] = self._heads(F.linear(part, layer.ck)).transpose(-1, -2)
                cv[s:s + step] = self._heads(F.linear(part, *layer.cv))
            cross.append((ck, cv))
        return cross

    def _guard_loops(self, out_tokens: torch.Tensor, rows: torch.Tensor, done: torch.Tensor,
                     length: int, ratio: float, looped: list[bool]) -> None:
        """Stop rows stuck in a repetition loop: their text so far compresses too well. They are
        marked and fall back (their compression ratio is over whisper's threshold anyway)."""
        live_rows = rows[~done[rows]].tolist()
        if not live_rows:
            return
        seqs = out_tokens[live_rows, :length].cpu().tolist()
        for r, seq in zip(live_rows, seqs, strict=True):
            text = self.tok.decode([t for t in seq if t < self.eot])
            if len(text) > 120 and compression_ratio(text) > ratio:
                looped[r] = True
                done[r] = True


@dataclass
class _Beams:
    """The live sequences of a beam search, `beams` entries per row: cumulative log-prob
    (-inf: an idle entry), tokens and per-token log-probs."""

    score: list[float]
    seqs: list[list[int]]
    lps: list[list[float]]

    def step(self, cand_tok: list[list[int]], cand_lp: list[list[float]], beams: int, eot: int,
             finished: list[list[tuple[float, list[int], list[float]]]]
             ) -> tuple[list[int], list[int], _Beams]:
        """One step of whisper's BeamSearchDecoder for every row: each live entry's candidate
        tokens, best cumulative score first; an eot candidate ends a sequence (kept while the
        row has fewer than `beams` ended), others fill the row's entries until `beams` are
        kept. Returns each entry's source entry, its next token, and the new live beams."""
        entries = len(self.score)
        source = list(range(entries))
        chosen = [eot] * entries
        score = [float("-inf")] * entries
        seqs: list[list[int]] = [[] for _ in range(entries)]
        lps: list[list[float]] = [[] for _ in range(entries)]
        for r in range(entries // beams):
            if len(finished[r]) >= beams:
                continue  # done: its entries idle on eot
            first = r * beams
            cands = sorted(((self.score[e] + lp, e, tok, lp)
                            for e in range(first, first + beams) if self.score[e] > float("-inf")
                            for tok, lp in zip(cand_tok[e], cand_lp[e], strict=True)
                            if lp > float("-inf")), key=lambda c: c[0], reverse=True)
            kept = 0
            ended: list[tuple[float, list[int], list[float]]] = []
            for total, e, tok, lp in cands:
                if tok == eot:
                    ended.append((total, self.seqs[e], [*self.lps[e], lp]))
                    continue
                slot = first + kept
                source[slot], chosen[slot], score[slot] = e, tok, total
                seqs[slot], lps[slot] = [*self.seqs[e], tok], [*self.lps[e], lp]
                kept += 1
                if kept == beams:
                    break
            finished[r].extend(ended[:beams - len(finished[r])])
        return source, chosen, _Beams(score, seqs, lps)


def _partition(keep: list[bool], tensors: Sequence[Sequence[torch.Tensor]], rows: list[int],
               slot: list[int]) -> list[int]:
    """Swap the kept batch entries to the front of every per-row tensor, in place. `rows` maps
    each current entry to its original row; `slot` (original row → entry) is updated. Returns
    the new order of the current entries (a permutation of range(len(keep)))."""
    alive = sum(keep)
    order = list(range(len(keep)))
    holes = [i for i in range(alive) if not keep[i]]
    movers = [j for j in range(alive, len(keep)) if keep[j]]
    for i, j in zip(holes, movers, strict=True):
        for group in tensors:
            for t in group:
                row = t[i].clone()
                t[i] = t[j]
                t[j] = row
        order[i], order[j] = order[j], order[i]
        slot[rows[i]], slot[rows[j]] = j, i
    return order
