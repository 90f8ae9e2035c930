"""The JSON rendering is whisper's WriteJSON output (the same dict, words included), indented,
byte for byte what json.dumps(..., indent=2) writes, though built a segment at a time."""

from __future__ import annotations

import io
import json

from longscribe.service import formats
from longscribe.v1 import transcription_pb2 as pb
from whisper.utils import WriteJSON


def _segments() -> list[pb.Segment]:
    return [
        pb.Segment(id=0, start=0.0, end=2.5, text=" Ask not what your country can do",
                   avg_logprob=-0.21, no_speech_prob=0.01, compression_ratio=1.3,
                   words=[pb.Word(word=" Ask", start=0.0, end=0.4, probability=0.91),
                          pb.Word(word=" not", start=0.4, end=0.7, probability=0.88)]),
        pb.Segment(id=1, start=2.5, end=4.0, text=' "Zürich"\n — naïve, 北京',
                   temperature=0.2, words=[]),
    ]


def _whisper_json(text: str, segments: list[pb.Segment], language: str) -> object:
    buffer = io.StringIO()
    result = {"text": text, "segments": formats.segment_dicts(segments), "language": language}
    WriteJSON(output_dir=".").write_result(result, file=buffer)
    return json.loads(buffer.getvalue())


def test_json_is_whispers_dict_indented() -> None:
    for segments in (_segments(), []):
        text = " ".join(s.text.strip() for s in segments)
        ours = formats.render("json", text, segments, "en")
        expected = _whisper_json(text, segments, "en")
        assert json.loads(ours) == expected
        assert ours == json.dumps(expected, ensure_ascii=False, indent=2) + "\n"
