"""Word timings, and sentence-level segment boundaries from them.

Word times come from cross-attention alignment (whisper's own method: alignment heads + DTW,
`whisper.timing`) on the decode's own cross state. Whisper groups several sentences into one
timestamped segment when the speaker runs on; the segmenter knows exactly where the pauses are,
so a segment is split at a pause between the words on either side of it, and word and segment
bounds that fall inside a pause are moved to the speech.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from whisper import timing
from whisper.model import Whisper, disable_sdpa
from whisper.timing import TOKENS_PER_SECOND
from whisper.tokenizer import Tokenizer

from .transcriber import APPEND_PUNCTUATION, PREPEND_PUNCTUATION, SAMPLE_RATE

log = logging.getLogger(__name__)

MIN_PAUSE = int(0.3 * SAMPLE_RATE)  # shorter silences are within a phrase
SNAP = int(0.5 * SAMPLE_RATE)  # word bounds this close to a VAD pause move onto its edge
MAX_SHIFT = 1.0  # seconds: a pause farther than this from every word start is not used


@dataclass
class WordTiming:
    """One word (punctuation merged in, as whisper does): its text, its tokens, absolute sample
    bounds, and the mean probability of its tokens in the decode."""

    word: str
    tokens: list[int]
    start: int
    end: int
    probability: float = 1.0


@dataclass
class Piece:
    """A segment under construction: absolute sample bounds and its text tokens (no special
    or timestamp tokens), and its words once assigned."""

    start: int
    end: int
    tokens: list[int]
    words: list[WordTiming] = field(default_factory=list)


@numba.jit(nopython=True, cache=True)
def _dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """whisper.timing.dtw_cpu + backtrace, same path and tie-breaking, but compiled once per
    install (numba's on-disk cache) instead of once per process (~2.5 s in the first job)."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0 = cost[i - 1, j - 1]
            c1 = cost[i - 1, j]
            c2 = cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = n, m
    trace[0, :] = 2
    trace[:, 0] = 1
    text = np.empty(n + m, dtype=np.int64)
    time = np.empty(n + m, dtype=np.int64)
    k = 0
    while i > 0 or j > 0:
        text[k], time[k] = i - 1, j - 1
        k += 1
        if trace[i, j] == 0:
            i -= 1
            j -= 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    return text[:k][::-1].copy(), time[:k][::-1].copy()


# A median-of-7 selection network (Devillard's 13 comparators): (i, j, keep min, keep max).
# Only the outputs read later are computed; the median ends up in position 3.
_MEDIAN7 = ((0, 5, True, True), (0, 3, True, True), (1, 6, True, True), (2, 4, True, True),
            (0, 1, False, True), (3, 5, True, True), (2, 6, True, True), (2, 3, False, True),
            (3, 6, True, False), (4, 5, True, False), (1, 4, True, True), (1, 3, False, True),
            (3, 4, True, False))


def median_filter7(x: torch.Tensor) -> torch.Tensor:
    """whisper.timing.median_filter(x, 7) (reflect padding, along the last axis), the same
    values, from elementwise min/max instead of sorting every 7-frame window (4x faster on
    CPU; it was three quarters of the alignment's time)."""
    n = x.shape[-1]
    if n <= 3:  # reflect padding needs more frames than it pads; whisper returns x as is
        return x
    padded = torch.nn.functional.pad(x, (3, 3), mode="reflect")
    v: list[torch.Tensor] = [padded[..., i:i + n] for i in range(7)]
    for i, j, low, high in _MEDIAN7:
        a, b = v[i], v[j]
        if low:
            v[i] = torch.minimum(a, b)
        if high:
            v[j] = torch.maximum(a, b)
    return v[3]


def warm_up() -> None:
    """Load (or, on the first run after an install, compile) the DTW kernel. A cache that
    does not load is compiled past: numba pickles the name the module was imported under, so
    a checkout imported under two names (`service.…` and `longscribe.service.…`) writes a
    cache that the other name cannot read, and the engine must still start."""
    global _dtw
    probe = np.zeros((2, 3), dtype=np.float64)
    try:
        _dtw(probe)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the cache's
        log.warning("the cached word-alignment kernel did not load (%s); compiling it for "
                    "this process", exc)
        _dtw = numba.jit(nopython=True, cache=False)(_dtw.py_func)
        _dtw(probe)


def pauses(speech: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Silences of at least MIN_PAUSE between consecutive speech spans (absolute samples)."""
    return [(a[1], b[0]) for a, b in zip(speech, speech[1:], strict=False)
            if b[0] - a[1] >= MIN_PAUSE]


def word_timings(model: Whisper, tok: Tokenizer, features: torch.Tensor, text_tokens: list[int],
                 num_frames: int, cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 ) -> list[timing.WordTiming]:
    """Words with start and end in seconds from the row's audio start (probability unset), by
    whisper's alignment method, on audio features already computed for the batch (no second
    encoder pass) and, where given, the decode's cross-attention keys and values per layer (no
    second projection)."""
    sot = list(tok.sot_sequence)
    tokens = torch.tensor([*sot, tok.no_timestamps, *text_tokens, tok.eot], device=features.device)
    qks: list[torch.Tensor | None] = [None] * model.dims.n_text_layer
    hooks = [block.cross_attn.register_forward_hook(
        lambda _m, _i, outs, index=i: qks.__setitem__(index, outs[-1][0]))
        for i, block in enumerate(model.decoder.blocks)]
    heads = model.alignment_heads.indices().T
    dec = model.decoder
    kv_cache = None
    if cross is not None:
        kv_cache = {}
        for block, (k, v) in zip(dec.blocks, cross, strict=True):
            kv_cache[block.cross_attn.key] = k
            kv_cache[block.cross_attn.value] = v
    try:
        with torch.inference_mode(), disable_sdpa():
            # the decoder's blocks up to the last one with an alignment head: the vocabulary
            # projection after them (a third of the cost) is not needed for the weights
            x = (dec.token_embedding(tokens[None]) + dec.positional_embedding[:len(tokens)])
            x = x.to(features.dtype)
            for block in dec.blocks[:int(heads[:, 0].max()) + 1]:
                x = block(x, features[None], mask=dec.mask, kv_cache=kv_cache)
    finally:
        for h in hooks:
            h.remove()
    weights = torch.stack([qks[layer][head] for layer, head in heads]).float()
    weights = weights[:, :, : max(num_frames // 2, 1)].softmax(dim=-1)
    # two passes of plain reductions: 5x faster than std_mean across the token axis on CPU
    mean = weights.mean(dim=-2, keepdim=True)
    std = (weights - mean).square().mean(dim=-2, keepdim=True).sqrt()
    weights = median_filter7((weights - mean) / (std + 1e-9))
    matrix = weights.mean(dim=0)[len(sot):-1]
    text_idx, time_idx = _dtw(np.ascontiguousarray(-matrix.double().cpu().numpy()))
    return words_from_path(tok, text_tokens, text_idx, time_idx)


def words_from_path(tok: Tokenizer, text_tokens: list[int], text_idx: np.ndarray,
                    time_idx: np.ndarray) -> list[timing.WordTiming]:
    """Words and their times (seconds from the row's audio start) from a DTW path over
    (text token, audio frame), as whisper.timing.find_alignment reads it."""
    words, word_tokens = tok.split_to_word_tokens(text_tokens + [tok.eot])
    if len(word_tokens) <= 1 or len(text_idx) == 0:
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND
    if len(jump_times) <= bounds[-1]:
        return []
    starts, ends = jump_times[bounds[:-1]], jump_times[bounds[1:]]
    return [timing.WordTiming(w, t, float(s), float(e), 1.0)
            for w, t, s, e in zip(words[:-1], word_tokens[:-1], starts, ends, strict=True)]


def place_words(words: list[timing.WordTiming], base: int, token_logprobs: list[float],
                speech: tuple[tuple[int, int], ...]) -> list[WordTiming]:
    """Aligned words → absolute samples, punctuation merged into its word (whisper's rule),
    bounds pulled out of the VAD's pauses onto the speech (the alignment smears a word over the
    silence before or after it), each with its probability (the mean of its tokens'
    probabilities in the decode)."""
    timing.merge_punctuations(words, PREPEND_PUNCTUATION, APPEND_PUNCTUATION)
    out: list[WordTiming] = []
    silences = pauses(speech)
    k = 0
    kept = [w for w in words if w.tokens]  # merging empties the punctuation's own entries
    for i, w in enumerate(kept):
        lps = token_logprobs[k:k + len(w.tokens)]
        k += len(w.tokens)
        prob = float(np.mean(np.exp(lps))) if lps else 1.0
        s, e = base + int(w.start * SAMPLE_RATE), base + int(w.end * SAMPLE_RATE)
        for ps, pe in silences:
            if ps <= s < pe and pe < e:
                s = pe  # starts in a pause, ends in speech after it
            elif s < ps < e <= pe:
                e = ps  # ends in a pause after its speech
            elif s < ps and pe < e:
                # spans a whole pause: no word does. The row's last word is stretched over
                # speech the decode never reached, its first over audio before its speech;
                # elsewhere the longer side wins.
                if i == len(kept) - 1 or (i and ps - s >= e - pe):
                    e = ps
                else:
                    s = pe
        out.append(WordTiming(w.word, w.tokens, s, max(e, s), prob))
    for before, after in zip(out, out[1:], strict=False):
        # a pause between two words: the alignment lags the speech, the VAD does not; the word
        # after the pause starts where speech resumes, the one before ends where it stopped
        for ps, pe in silences:
            if before.end <= pe and after.start >= ps:
                if pe <= after.start < pe + SNAP and pe < after.end:
                    after.start = pe
                if ps - SNAP < before.end <= ps and before.start < ps:
                    before.end = ps
    return out


def assign_words(pieces: list[Piece], words: list[WordTiming]) -> None:
    """Give each piece its words (in order, by token count) and bound it by them: whisper's
    segment timestamps are loose, the end of a window's last segment especially."""
    w = 0
    for piece in pieces:
        count = 0
        while w < len(words) and count < len(piece.tokens):
            piece.words.append(words[w])
            count += len(words[w].tokens)
            w += 1
        if piece.words:
            piece.start = piece.words[0].start
            piece.end = max(piece.words[-1].end, piece.start)


def split_at_pauses(pieces: list[Piece], words: list[tuple[list[int], float]], base: int,
                    silences: list[tuple[int, int]], tok: Tokenizer) -> list[Piece]:
    """Split pieces at silences that fall inside them, between the words the alignment puts
    on either side; a piece (or a split part) starts where the speech resumes."""
    out: list[Piece] = []
    w = 0
    for piece in pieces:
        n = len(piece.tokens)
        # the words of this piece: consume word tokens until its text tokens are covered
        mine: list[tuple[list[int], int]] = []  # (tokens, absolute start sample)
        count = 0
        while w < len(words) and count < n:
            toks, start = words[w]
            mine.append((toks, base + int(start * SAMPLE_RATE)))
            count += len(toks)
            w += 1
        if not mine:
            out.append(piece)
            continue
        cuts: list[tuple[int, int, int]] = []  # (word index, end of left part, start of right)
        # a part starts at a word, never at punctuation or inside a word
        starts_word = [j for j in range(1, len(mine)) if tok.decode(mine[j][0]).startswith(" ")]
        for ps, pe in silences:
            if not (piece.start + MIN_PAUSE < ps and pe < piece.end - MIN_PAUSE):
                continue
            best = min(starts_word, key=lambda j: abs(mine[j][1] - pe), default=None)
            if best is None or abs(mine[best][1] - pe) > MAX_SHIFT * SAMPLE_RATE:
                continue
            if cuts and best <= cuts[-1][0]:
                continue
            cuts.append((best, ps, pe))
        start, first = piece.start, 0
        for j, ps, pe in cuts:
            out.append(Piece(start, max(ps, start), [t for ws in mine[first:j] for t in ws[0]]))
            start, first = pe, j
        out.append(Piece(start, max(piece.end, start), [t for ws in mine[first:] for t in ws[0]]))
    for p in out:
        # a segment that starts inside a silence starts where the speech does
        for ps, pe in silences:
            if ps <= p.start < pe < p.end:
                p.start = pe
    return out


SENTENCE_END = (".", "?", "!")


def split_at_sentences(pieces: list[Piece]) -> list[Piece]:
    """Cut pieces after every word that ends a sentence. Text decoded without timestamp tokens
    comes as one piece per stretch of speech between pauses; whisper's timestamp tokens would
    mostly have cut it at its sentences (subtitle lines, per-segment confidence). A piece whose
    words do not cover all its tokens (a partial alignment) stays whole."""
    out: list[Piece] = []
    for piece in pieces:
        words = piece.words
        if sum(len(w.tokens) for w in words) != len(piece.tokens):
            out.append(piece)
            continue
        run: list[WordTiming] = []
        for i, word in enumerate(words):
            run.append(word)
            if i == len(words) - 1 or word.word.rstrip().endswith(SENTENCE_END):
                out.append(Piece(run[0].start, max(run[-1].end, run[0].start),
                                 [t for w in run for t in w.tokens], run))
                run = []
    return out
