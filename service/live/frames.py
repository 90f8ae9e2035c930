"""A live session's configuration and its audio frames, checked and decoded."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import invalid
from ..transcriber import SAMPLE_RATE

ENCODINGS = {"pcm_s16le": 2, "f32le": 4}  # bytes per sample
OVERFLOW_POLICIES = ("drop_oldest", "reject", "block")
DEFAULT_SOURCE = "default"
MAX_SOURCES = 16
MAX_SOURCE_NAME = 64
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class LiveSettings:
    """The checked LiveConfig (options are kept as the protobuf message)."""

    sources: tuple[str, ...]
    encoding: str
    overflow: str
    partials: bool
    session_id: str

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.encoding]


def check_config(sources: list[str], sample_rate: int, encoding: str, overflow: str,
                 no_partials: bool, session_id: str) -> LiveSettings:
    """Raises JobError(INVALID_ARGUMENT) saying what is wrong."""
    names = tuple(sources) or (DEFAULT_SOURCE,)
    if len(names) > MAX_SOURCES:
        raise invalid(f"at most {MAX_SOURCES} sources per session, not {len(names)}")
    for name in names:
        if not name or len(name) > MAX_SOURCE_NAME or not _SOURCE_NAME.match(name):
            raise invalid(f"source name {name[:80]!r}: use 1-{MAX_SOURCE_NAME} letters, digits, "
                          "'.', '_' or '-'")
    if len(set(names)) != len(names):
        raise invalid("source names must be distinct")
    if sample_rate != SAMPLE_RATE:
        raise invalid(f"sample_rate {sample_rate}: live audio must be {SAMPLE_RATE} Hz mono "
                      f"(resample it first, e.g. ffmpeg -ar {SAMPLE_RATE} -ac 1)")
    encoding = encoding or "pcm_s16le"
    if encoding not in ENCODINGS:
        raise invalid(f"encoding {encoding[:40]!r}: use 'pcm_s16le' or 'f32le'")
    overflow = overflow or "drop_oldest"
    if overflow not in OVERFLOW_POLICIES:
        raise invalid(f"overflow {overflow[:40]!r}: use 'drop_oldest', 'reject' or 'block'")
    if len(session_id) > 128:
        raise invalid("session_id is longer than 128 characters")
    return LiveSettings(names, encoding, overflow, not no_partials, session_id)


def decode_frame(data: bytes, encoding: str, max_samples: int) -> np.ndarray:
    """Frame bytes → float32 samples in [-1, 1]; INVALID_ARGUMENT for a frame that is not a
    whole number of samples, too long, or (f32le) not finite."""
    width = ENCODINGS[encoding]
    if len(data) % width:
        raise invalid(f"an audio frame of {len(data)} bytes is not a whole number of "
                      f"{width}-byte {encoding} samples")
    count = len(data) // width
    if count > max_samples:
        raise invalid(f"an audio frame of {count} samples ({count / SAMPLE_RATE:.2f} s) is over "
                      f"the limit of {max_samples / SAMPLE_RATE:.2f} s per frame: send smaller "
                      "frames (20-200 ms is typical)")
    if encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise invalid("an f32le audio frame holds NaN or infinite samples")
    return np.clip(samples, -1.0, 1.0)
