"""Engines by name (`--engine`): one line each in BACKENDS, each a function that builds its
batch decoder from the server's Config. The scheduler (`engine.Engine`) is the same for all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import Config
from .engine import Engine
from .models import ModelLoadError, default_model_dir, load_model, resolve_device


def _torch(config: Config) -> Any:
    from .torch_backend import TorchBackend

    if config.beam_size > 1:
        raise ModelLoadError("the torch engine decodes greedily: --beam-size needs --engine ct2")
    return TorchBackend(load_model(config.model, config.device))


def _ct2(config: Config) -> Any:
    from pathlib import Path

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
        return CT2Backend(model_dir, device=device, compute_type=compute_type,
                          beam_size=config.beam_size or 5)
    except CT2LoadError as exc:
        raise ModelLoadError(str(exc)) from exc


BACKENDS: dict[str, Callable[[Config], Any]] = {"torch": _torch, "ct2": _ct2}


def engine_name(config: Config) -> str:
    """`auto`: torch, on a GPU (the design's engine) and on CPU too, where it measured faster
    end to end than ct2 (`make bench --engine ...`, see README); ct2 with beam search is the
    more accurate choice on CPU."""
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
    return Engine(BACKENDS[name](config), batch_size=config.batch_size or None)
