"""Engines by name through real servers: `--engine ct2` (CTranslate2 with beam search on the
offline CTranslate2 model, natively) and the torch engine with `--beam-size` end to end, and
the clear errors for what an engine cannot load or do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import JFK, ServerProcess, jfk_text, require_testdata, wer


@pytest.mark.parametrize(("engine", "described"), [
    # on CPU the ct2 encoder is openai-whisper's on the same weights (faster there)
    ("ct2", "ct2 engine, CTranslate2 on cpu (float32, beam 5; encoder: openai-whisper fp32)"),
    ("torch", "torch engine, openai-whisper on cpu (float32, beam 5)"),
])
def test_beam_search_engines_end_to_end(tmp_path: Path, engine: str, described: str) -> None:
    from longscribe.client.client import LongscribeClient

    require_testdata()
    server = ServerProcess(tmp_path / engine, "--engine", engine, "--beam-size", "5").start(
        timeout=300)
    try:
        assert described in server.log()
        with LongscribeClient(server.target, timeout=60) as client:
            result = client.transcribe(JFK)
        assert wer(jfk_text(), result.text) <= 0.05, result.text
        words = [w for s in result.segments for w in s.words]
        assert [w.word.strip(" ,.") for w in words][:3] == ["And", "so", "my"]
        americans = next(w for w in words if "Americans" in w.word)
        assert americans.start <= 1.8 <= americans.end + 0.3  # whisper's own test: t = 1.8 s
    finally:
        server.stop()


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "ct2", "--model", "tiny.en"],
     "the ct2 engine needs a CTranslate2 Whisper model directory"),
    (["--engine", "torch", "--beam-size", "-2"], "--beam-size -2: give 0"),
])
def test_engine_refuses_what_it_cannot_run(tmp_path: Path, args: list[str], message: str) -> None:
    server = ServerProcess(tmp_path / "bad", *args).start(wait=False)
    assert server.proc is not None
    code = server.proc.wait(timeout=120)
    assert code != 0
    assert message in server.log()
