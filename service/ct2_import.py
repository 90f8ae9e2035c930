"""Import a CTranslate2 (faster-whisper) Whisper model directory into openai-whisper.

CTranslate2 writes `model.bin` as (little-endian, see ctranslate2/specs/model_spec.py):

    u32 binary_version
    [version >= 2] string spec_name, u32 spec_revision
    u32 n_variables, then per variable:
        string name, u8 rank, u32 dims[rank],
        [version >= 4] u8 dtype_id, u32 n_bytes      [older] u8 item_size, u32 n_items
        raw bytes
    [version >= 3] u32 n_aliases, then (string alias, string target) pairs

where a string is u16 length (including a trailing NUL) followed by the UTF-8 bytes and the NUL.
Quantized weights `X` come with a `X_scale` variable (int8: one scale per output row; int16: a
single scale) such that `X_float = X / X_scale`.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
# The newest layout this reader knows; CTranslate2 4.x writes 6.
MAX_BINARY_VERSION = 6

# CTranslate2's DataType enum order (include/ctranslate2/types.h).
_DTYPE_IDS: dict[int, str] = {
    0: "float32",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "float16",
    5: "bfloat16",
}
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    # numpy has no bfloat16: read the raw 16-bit words, widen them to float32 afterwards.
    "bfloat16": np.dtype("<u2"),
}
# Files written before binary version 4 give only an item size.
_LEGACY_ITEM_SIZES: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}

# CTranslate2's Activation enum value for exact (erf) GELU, which Whisper uses.
_GELU = 3

# Official openai-whisper models, keyed by the shapes that tell them apart. large-v1 and
# large-v2 share every shape, so they are left out (their alignment heads differ).
_OFFICIAL_BY_SHAPE: dict[tuple[int, int, int, int, int], str] = {
    # (n_mels, n_audio_state, n_audio_layer, n_text_layer, n_vocab): name
    (80, 384, 4, 4, 51864): "tiny.en",
    (80, 384, 4, 4, 51865): "tiny",
    (80, 512, 6, 6, 51864): "base.en",
    (80, 512, 6, 6, 51865): "base",
    (80, 768, 12, 12, 51864): "small.en",
    (80, 768, 12, 12, 51865): "small",
    (80, 1024, 24, 24, 51864): "medium.en",
    (80, 1024, 24, 24, 51865): "medium",
    (128, 1280, 32, 32, 51866): "large-v3",
    (128, 1280, 32, 4, 51866): "large-v3-turbo",
}


class CT2ImportError(ValueError):
    """The directory is not a CTranslate2 Whisper model this importer can read."""


@dataclass
class CT2ModelFile:
    """The parsed contents of a `model.bin`: arrays in their stored dtype (bfloat16 widened to
    float32); `aliases` maps a name to the stored variable it shares (see `with_aliases`)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# model.bin reader


class _Reader:
    """Sequential reads that turn a short file into a CT2ImportError instead of struct.error."""

    def __init__(self, fp: BinaryIO, path: Path) -> None:
        self._fp = fp
        self._path = path

    def _read(self, n: int) -> bytes:
        data = self._fp.read(n)
        if len(data) != n:
            raise CT2ImportError(f"{self._path} is truncated (wanted {n} bytes at {self.pos()})")
        return data

    def pos(self) -> int:
        return self._fp.tell()

    def u8(self) -> int:
        return self._read(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self._read(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._read(4))[0]

    def string(self) -> str:
        raw = self._read(self.u16())
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2ImportError(f"{self._path} has a corrupt name at byte {self.pos()}") from exc

    def array(self, n_bytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        # A bytearray keeps the array writable, so torch.from_numpy can share it without a warning.
        buf = bytearray(n_bytes)
        if self._fp.readinto(buf) != n_bytes:
            raise CT2ImportError(f"{self._path} is truncated inside a weight at {self.pos()}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


def read_model_bin(path: str | Path) -> CT2ModelFile:
    """Parse a CTranslate2 `model.bin`."""
    path = Path(path)
    try:
        fp = path.open("rb")
    except OSError as exc:
        raise CT2ImportError(f"cannot open {path}: {exc.strerror or exc}") from exc
    with fp:
        r = _Reader(fp, path)
        version = r.u32()
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise CT2ImportError(
                f"{path}: binary version {version} is not one this importer reads "
                f"(1..{MAX_BINARY_VERSION}); is it a CTranslate2 model.bin?"
            )
        spec, revision = (r.string(), r.u32()) if version >= 2 else ("", 1)
        model = CT2ModelFile(binary_version=version, spec=spec, revision=revision)
        for _ in range(r.u32()):
            name, array = _read_variable(r, version, path)
            model.variables[name] = array
        if version >= 3:
            for _ in range(r.u32()):
                alias, target = r.string(), r.string()
                model.aliases[alias] = target
        for alias, target in model.aliases.items():
            if target not in model.variables:
                raise CT2ImportError(f"{path}: alias {alias} points at missing {target}")
    return model


def with_aliases(
    variables: dict[str, np.ndarray], aliases: dict[str, str]
) -> dict[str, np.ndarray]:
    """Variables plus every alias, sharing its target's array. Resolve after `dequantized`:
    an alias has no scale of its own (CTranslate2 aliases before it quantizes)."""
    out = dict(variables)
    for alias, target in aliases.items():
        out[alias] = variables[target]
    return out


def _read_variable(r: _Reader, version: int, path: Path) -> tuple[str, np.ndarray]:
    name = r.string()
    shape = tuple(r.u32() for _ in range(r.u8()))
    if version >= 4:
        type_id = r.u8()
        if type_id not in _DTYPE_IDS:
            raise CT2ImportError(f"{path}: variable {name} has unknown dtype id {type_id}")
        dtype_name = _DTYPE_IDS[type_id]
        n_bytes = r.u32()
    else:
        item_size = r.u8()
        if item_size not in _LEGACY_ITEM_SIZES:
            raise CT2ImportError(f"{path}: variable {name} has item size {item_size}")
        dtype_name = _LEGACY_ITEM_SIZES[item_size]
        n_bytes = r.u32() * item_size
    dtype = _NUMPY_DTYPES[dtype_name]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n_bytes != expected:
        raise CT2ImportError(
            f"{path}: variable {name} holds {n_bytes} bytes, its shape {list(shape)} of "
            f"{dtype_name} needs {expected}"
        )
    array = r.array(n_bytes, dtype, shape)
    if dtype_name == "bfloat16":
        # bfloat16 is the top half of a float32.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return name, array


# ---------------------------------------------------------------------------------------------
# Whisper mapping


def dequantized(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Variables with every quantized `X` divided by its `X_scale`; the scales are dropped."""
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None and value.dtype.kind in "iu":
            scale = np.asarray(scale, dtype=np.float32)
            # int8 has one scale per output row; int16 a single one.
            if scale.ndim == 1 and value.ndim >= 2:
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            value = value.astype(np.float32) / scale
        out[name] = value
    return out


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def _scalar(variables: dict[str, np.ndarray], name: str) -> int | None:
    value = variables.get(name)
    return None if value is None else int(np.asarray(value).reshape(-1)[0])


def infer_dims(variables: dict[str, np.ndarray]) -> ModelDimensions:
    """Whisper's dimensions, read off the weight shapes (and the stored head counts)."""
    try:
        conv1 = variables["encoder/conv1/weight"]
        enc_pos = variables["encoder/position_encodings/encodings"]
        embed = variables["decoder/embeddings/weight"]
        dec_pos = variables["decoder/position_encodings/encodings"]
    except KeyError as exc:
        raise CT2ImportError(f"not a Whisper model: variable {exc.args[0]} is missing") from exc
    n_audio_head = _scalar(variables, "encoder/num_heads")
    n_text_head = _scalar(variables, "decoder/num_heads")
    if n_audio_head is None or n_text_head is None:
        raise CT2ImportError("not a Whisper model: the encoder/decoder head counts are missing")
    dims = ModelDimensions(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(enc_pos.shape[0]),
        n_audio_state=int(conv1.shape[0]),
        n_audio_head=n_audio_head,
        n_audio_layer=_count_layers(variables, "encoder"),
        n_vocab=int(embed.shape[0]),
        n_text_ctx=int(dec_pos.shape[0]),
        n_text_state=int(embed.shape[1]),
        n_text_head=n_text_head,
        n_text_layer=_count_layers(variables, "decoder"),
    )
    if not (
        dims.n_audio_layer and dims.n_text_layer and n_audio_head > 0 and n_text_head > 0
        and dims.n_audio_state % n_audio_head == 0 and dims.n_text_state % n_text_head == 0
    ):
        raise CT2ImportError(f"inconsistent Whisper dimensions read from the weights: {dims}")
    return dims


def official_name(dims: ModelDimensions) -> str | None:
    """The official openai-whisper model these shapes belong to, when the shapes tell."""
    key = (dims.n_mels, dims.n_audio_state, dims.n_audio_layer, dims.n_text_layer, dims.n_vocab)
    return _OFFICIAL_BY_SHAPE.get(key)


class _Mapper:
    """Moves CT2 variables into a whisper state dict, remembering which ones it used."""

    def __init__(self, variables: dict[str, np.ndarray]) -> None:
        self.variables = variables
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}

    def take(self, ct2_name: str) -> np.ndarray:
        try:
            value = self.variables[ct2_name]
        except KeyError as exc:
            raise CT2ImportError(f"variable {ct2_name} is missing from model.bin") from exc
        self.used.add(ct2_name)
        return value

    def put(self, whisper_name: str, value: np.ndarray) -> None:
        self.state[whisper_name] = torch.from_numpy(np.ascontiguousarray(value))

    def copy(self, whisper_name: str, ct2_name: str) -> None:
        self.put(whisper_name, self.take(ct2_name))

    def linear(self, whisper_prefix: str, ct2_prefix: str) -> None:
        self.copy(f"{whisper_prefix}.weight", f"{ct2_prefix}/weight")
        self.copy(f"{whisper_prefix}.bias", f"{ct2_prefix}/bias")

    def layer_norm(self, whisper_prefix: str, ct2_prefix: str) -> None:
        self.copy(f"{whisper_prefix}.weight", f"{ct2_prefix}/gamma")
        self.copy(f"{whisper_prefix}.bias", f"{ct2_prefix}/beta")

    def fused(self, whisper_prefix: str, ct2_prefix: str, parts: tuple[str, ...]) -> None:
        """Split a fused projection (q/k/v or k/v) back into whisper's separate Linears.

        whisper's key projection has no bias; CTranslate2 stores zeros in its slot. Dropping it
        is exact even when it is not zero: q·b_k is the same for every key of a query, and
        softmax ignores a constant shift.
        """
        weight, bias = self.take(f"{ct2_prefix}/weight"), self.take(f"{ct2_prefix}/bias")
        if weight.ndim != 2 or weight.shape[0] % len(parts) or bias.shape != weight.shape[:1]:
            raise CT2ImportError(
                f"{ct2_prefix} has shape {list(weight.shape)}, not {len(parts)} fused projections"
            )
        weights = np.split(weight, len(parts), axis=0)
        biases = np.split(bias, len(parts), axis=0)
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            self.put(f"{whisper_prefix}.{part}.weight", weight)
            if part != "key":
                self.put(f"{whisper_prefix}.{part}.bias", bias)


def _block(m: _Mapper, whisper_prefix: str, ct2_prefix: str, cross: bool) -> None:
    w, c = whisper_prefix, ct2_prefix
    m.fused(f"{w}.attn", f"{c}/self_attention/linear_0", ("query", "key", "value"))
    m.linear(f"{w}.attn.out", f"{c}/self_attention/linear_1")
    m.layer_norm(f"{w}.attn_ln", f"{c}/self_attention/layer_norm")
    if cross:
        m.linear(f"{w}.cross_attn.query", f"{c}/attention/linear_0")
        m.fused(f"{w}.cross_attn", f"{c}/attention/linear_1", ("key", "value"))
        m.linear(f"{w}.cross_attn.out", f"{c}/attention/linear_2")
        m.layer_norm(f"{w}.cross_attn_ln", f"{c}/attention/layer_norm")
    m.linear(f"{w}.mlp.0", f"{c}/ffn/linear_0")
    m.linear(f"{w}.mlp.2", f"{c}/ffn/linear_1")
    m.layer_norm(f"{w}.mlp_ln", f"{c}/ffn/layer_norm")


def _check_decoder_flags(variables: dict[str, np.ndarray]) -> None:
    """Refuse the decoder options openai-whisper's architecture cannot express."""
    expected = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/activation": _GELU}
    for name, want in expected.items():
        got = _scalar(variables, name)
        if got is not None and got != want:
            raise CT2ImportError(f"{name} is {got}; openai-whisper needs {want}")
    for name in ("decoder/alibi", "decoder/start_from_zero_embedding"):
        if _scalar(variables, name):
            raise CT2ImportError(f"{name} is set; openai-whisper has no such option")


def whisper_state_dict(
    variables: dict[str, np.ndarray], dims: ModelDimensions
) -> dict[str, torch.Tensor]:
    """openai-whisper's state dict from (dequantized) CT2 variables; weights keep their dtype."""
    _check_decoder_flags(variables)
    m = _Mapper(variables)
    m.linear("encoder.conv1", "encoder/conv1")
    m.linear("encoder.conv2", "encoder/conv2")
    m.copy("encoder.positional_embedding", "encoder/position_encodings/encodings")
    for i in range(dims.n_audio_layer):
        _block(m, f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    m.layer_norm("encoder.ln_post", "encoder/layer_norm")

    m.copy("decoder.token_embedding.weight", "decoder/embeddings/weight")
    m.copy("decoder.positional_embedding", "decoder/position_encodings/encodings")
    for i in range(dims.n_text_layer):
        _block(m, f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    m.layer_norm("decoder.ln", "decoder/layer_norm")

    # whisper ties the output projection to the token embedding; an untied one cannot be loaded.
    projection = variables.get("decoder/projection/weight")
    if projection is not None:
        m.used.add("decoder/projection/weight")
        embedding = variables["decoder/embeddings/weight"]
        if projection is not embedding and not np.array_equal(projection, embedding):
            raise CT2ImportError("the output projection is not tied to the token embedding")
    if "decoder/projection/bias" in variables:
        raise CT2ImportError("the output projection has a bias; openai-whisper has none")

    # Every weight must have found a home; leftovers mean a variant (e.g. low-rank Lite-Whisper).
    leftovers = sorted(
        name for name, value in variables.items() if name not in m.used and np.ndim(value) > 0
    )
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (" …" if len(leftovers) > 5 else "")
        raise CT2ImportError(f"weights openai-whisper has no place for: {shown}")
    return m.state


def read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CT2ImportError(f"{path} is not valid JSON: {exc}") from exc
    return config if isinstance(config, dict) else {}


def alignment_heads_dump(config: dict, dims: ModelDimensions) -> bytes | None:
    """The alignment heads as whisper's `set_alignment_heads` dump, or None for its default.

    First choice is the list the converter wrote into config.json (from the model's own
    generation config); next the official heads when the shapes name an official model;
    otherwise None keeps whisper's default (every head of the last half of the layers).
    """
    heads = config.get("alignment_heads")
    if heads:
        mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
        try:
            for layer, head in heads:
                mask[int(layer), int(head)] = True
        except (TypeError, ValueError, IndexError) as exc:
            raise CT2ImportError(f"config.json alignment_heads is malformed: {heads!r}") from exc
        return base64.b85encode(gzip.compress(mask.tobytes()))
    name = official_name(dims)
    if name is not None:
        return whisper._ALIGNMENT_HEADS[name]
    return None


def is_ct2_model_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def import_ct2_model(model_dir: str | Path) -> Whisper:
    """Build an fp32 CPU openai-whisper model from a CTranslate2 Whisper model directory."""
    model_dir = Path(model_dir)
    if not is_ct2_model_dir(model_dir):
        raise CT2ImportError(f"{model_dir} has no {MODEL_FILE}")
    ct2 = read_model_bin(model_dir / MODEL_FILE)
    if ct2.spec and ct2.spec != "WhisperSpec":
        raise CT2ImportError(f"{model_dir} holds a {ct2.spec} model, not a Whisper model")
    variables = with_aliases(dequantized(ct2.variables), ct2.aliases)
    dims = infer_dims(variables)
    state = whisper_state_dict(variables, dims)

    model = Whisper(dims)
    try:
        # strict: every whisper parameter/buffer is filled and nothing is left over.
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a weight whose shape disagrees with the inferred dims
        raise CT2ImportError(f"weights do not fit a Whisper model of {dims}: {exc}") from exc
    dump = alignment_heads_dump(read_config(model_dir), dims)
    if dump is not None:
        model.set_alignment_heads(dump)
    return model.float().eval()

