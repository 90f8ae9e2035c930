"""Transcript renderings (txt, srt, vtt, json) made with openai-whisper's own writers, so our
subtitles match what `whisper --output_format` produces. JSON is what WriteJSON writes (the
result dict, words included), indented, and built a segment at a time."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from longscribe.v1 import transcription_pb2 as pb
from whisper.utils import WriteJSON, WriteSRT, WriteTXT, WriteVTT

_WRITERS = {"txt": WriteTXT, "srt": WriteSRT, "vtt": WriteVTT, "json": WriteJSON}


def segment_dicts(segments: Sequence[pb.Segment], *, words: bool = True,
                  ) -> list[dict[str, Any]]:
    """The segment dicts whisper's writers (and `transcribe()` users) expect."""
    out = [
        {
            "id": s.id,
            "start": round(s.start, 3),
            "end": round(s.end, 3),
            "text": s.text,
            "avg_logprob": s.avg_logprob,
            "no_speech_prob": s.no_speech_prob,
            "compression_ratio": s.compression_ratio,
            "temperature": s.temperature,
        }
        for s in segments
    ]
    if words:  # the shape of whisper's transcribe(word_timestamps=True)
        for d, s in zip(out, segments, strict=True):
            d["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                           "probability": round(w.probability, 4)} for w in s.words]
    return out


def render(fmt: str, text: str, segments: Sequence[pb.Segment], language: str) -> str:
    if fmt not in _WRITERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(_WRITERS)}")
    if fmt == "json":
        return _json(text, segments, language)
    # subtitles stay one cue per segment: given words, whisper's writers rebuild cues from them
    result = {"text": text, "segments": segment_dicts(segments, words=fmt == "json"),
              "language": language}
    buffer = io.StringIO()
    # The writers only use output_dir in __call__; write_result takes the file directly.
    _WRITERS[fmt](output_dir=".").write_result(result, file=buffer)
    return buffer.getvalue()


def _json(text: str, segments: Sequence[pb.Segment], language: str) -> str:
    """json.dumps(WriteJSON's dict, indent=2), one segment's dict at a time: a 3-hour
    transcript's word dicts all at once were ~50 MB at the end of its job."""
    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=2)

    parts = ['{\n  "text": ', dumps(text), ',\n  "segments": [']
    for i, segment in enumerate(segments):
        parts.append(",\n    " if i else "\n    ")
        parts.append(dumps(segment_dicts([segment])[0]).replace("\n", "\n    "))
    parts.append("\n  ]" if segments else "]")
    parts.append(f',\n  "language": {dumps(language)}\n}}\n')
    return "".join(parts)


def all_formats(text: str, segments: Sequence[pb.Segment], language: str) -> pb.Formats:
    return pb.Formats(**{fmt: render(fmt, text, segments, language) for fmt in _WRITERS})
