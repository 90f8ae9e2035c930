"""Engines by name (`--engine`): one line each in BACKENDS, each a function that builds its
batch decoder from the server's Config. The scheduler (`engine.Engine`) is the same for all."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .engine import Engine
from .models import ModelLoadError, default_model_dir, load_model, resolve_device

if TYPE_CHECKING:
    from .decoding import AudioEncoder

log = logging.getLogger(__name__)


# the torch engine's beam when --beam-size is 0: with text-only decoding (--timestamps words)
# a beam of 2 fits a CPU batch in one call and costs little over greedy (README, performance)
TORCH_BEAM = 2


def _torch(config: Config) -> Any:
    from .torch_backend import TorchBackend

    return TorchBackend(load_model(config.model, config.device),
                        beam_size=config.beam_size or TORCH_BEAM)


def _ct2(config: Config) -> Any:
    from .ct2_backend import CT2Backend, CT2LoadError

    device = str(resolve_device(config.device))
    cuda = device.startswith("cuda")
    compute_type = config.compute_type
    if compute_type == "auto":
        compute_type = "float16" if cuda else "float32"
    model_dir = Path(config.model).expanduser() if config.model else default_model_dir()
    if model_dir.is_file() and model_dir.name == "model.bin":
        model_dir = model_dir.parent
    try:
        backend = CT2Backend(model_dir, device=device, compute_type=compute_type,
                             beam_size=config.beam_size or 5)
    except CT2LoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    if not cuda:
        backend.encoder = cpu_encoder(model_dir)
    return backend


def cpu_encoder(model_dir: Path) -> AudioEncoder | None:
    """The ct2 engine's encoder on CPU: the same CTranslate2 weights imported into
    openai-whisper's encoder, fp32, which ran faster there than CTranslate2's own at any
    compute type (and int8 encoder output is less exact). None when the model cannot be
    imported: CTranslate2 then encodes too."""
    import torch

    from .decoding import AudioEncoder

    try:
        model = load_model(str(model_dir), "cpu")
    except ModelLoadError as exc:
        log.warning("ct2 engine: CTranslate2 encodes (%s)", exc)
        return None
    del model.decoder  # only the encoder runs here
    return AudioEncoder(model, torch.float32)


BACKENDS: dict[str, Callable[[Config], Any]] = {"torch": _torch, "ct2": _ct2}


def engine_name(config: Config) -> str:
    """`auto`: torch, on a GPU (the design's engine) and on CPU too, where it measured faster
    end to end than ct2 (`make bench --engine ...`, see README)."""
    return "torch" if config.engine == "auto" else config.engine


def _remote(config: Config) -> Any:
    """Not a batch decoder: the remote engine is a Transcriber of its own (its remote does the
    decoding; rate limits, retries and the circuit breaker are its scheduler)."""
    from .remote_engine import RemoteEngine, RemoteSettings

    try:
        return RemoteEngine(RemoteSettings.from_config(config))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def create_engine(config: Config) -> Any:
    name = engine_name(config)
    if name == "remote":
        return _remote(config)
    if name not in BACKENDS:
        raise ModelLoadError(f"unknown engine {name!r}: use one of auto, {', '.join(BACKENDS)}")
    if config.beam_size < 0:
        raise ModelLoadError(f"--beam-size {config.beam_size}: give 0 (the engine's default: "
                             f"{TORCH_BEAM} on torch, 5 on ct2) or a beam width of 1 or more")
    return Engine(BACKENDS[name](config), batch_size=config.batch_size or None,
                  timestamp_tokens=config.timestamps == "tokens")
