"""Wiring: the asyncio gRPC server (on its own event-loop thread), standard health and
reflection services, auth, TLS, metrics, the model and the job manager. `longscribe serve`
calls `serve(config)`."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from longscribe.service import config as config_module
from longscribe.service import memory, metrics
from longscribe.service.api import TranscriptionServicer
from longscribe.service.auth import BearerAuthInterceptor, load_tokens
from longscribe.service.datadir_lock import DataDirBusy, DataDirLock
from longscribe.service.jobs import JobManager
from longscribe.service.loop_thread import LoopThread
from longscribe.service.malformed import MalformedRequestInterceptor
from longscribe.service.store import JobStore
from longscribe.service.tls import NO_PORT_SHARING, add_port
from longscribe.v1 import transcription_pb2 as pb
from longscribe.v1 import transcription_pb2_grpc as pb_grpc

log = logging.getLogger("longscribe")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TranscriptionService"].full_name
UPLOAD_MESSAGE_LIMIT = 8 << 20  # uploads come in ~1 MiB chunks; leave headroom
RESPONSE_MESSAGE_LIMIT = 256 << 20  # a result carries the transcript in four formats
# Streams and uploads wait on the event loop without a thread; past this many calls at once,
# new ones get RESOURCE_EXHAUSTED instead of queueing forever.
MAX_CONCURRENT_RPCS = 4096
IO_THREADS = 32  # for the blocking parts of calls (SQLite, disk, DNS), see api.blocking


class LongscribeServer:
    """One server process. start() returns at once; the model loads in the background while
    health says NOT_SERVING, and jobs submitted meanwhile wait in the queue."""

    def __init__(self, config: config_module.Config) -> None:
        self.config = config
        config.data_path.mkdir(parents=True, exist_ok=True)
        self.lock = DataDirLock(config.data_path)  # before the store: one server per directory
        self.store = JobStore(config.data_path / "jobs.sqlite3")
        self.manager = JobManager(config, self.store)
        self.engine: Any = None
        self.live: Any = None  # service/live/runtime.LiveRuntime, once the model is loaded
        self.model_error: BaseException | None = None
        self.ready = threading.Event()
        self._metrics_server: Any = None
        self.tokens = load_tokens(config.auth_tokens, config.auth_tokens_file)
        self.loop = LoopThread()
        try:
            self.port = self.loop.run(self._build())
        except BaseException:
            self.loop.close()
            raise
        self.lock.record(f"{config.host}:{self.port}")

    async def _build(self) -> int:
        """The server and its services; created on the loop's thread, which they belong to."""
        config = self.config
        asyncio.get_running_loop().set_default_executor(
            futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="rpc-io"))
        self.health = health.aio.HealthServicer()
        interceptors = [BearerAuthInterceptor(self.tokens, open_health=config.auth_open_health),
                        MalformedRequestInterceptor()]
        self.grpc_server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                NO_PORT_SHARING,  # a second server on a busy port must fail, not share it
                ("grpc.max_receive_message_length", UPLOAD_MESSAGE_LIMIT),
                ("grpc.max_send_message_length", RESPONSE_MESSAGE_LIMIT),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        self.servicer = TranscriptionServicer(self.manager, config, self.tokens)
        pb_grpc.add_TranscriptionServiceServicer_to_server(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        port = add_port(self.grpc_server, config.host, config.port, cert=config.tls_cert,
                        key=config.tls_key, client_ca=config.tls_client_ca)
        await self._set_health_async(health_pb2.HealthCheckResponse.NOT_SERVING)
        return port

    async def _set_health_async(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _set_health(self, status: int) -> None:
        self.loop.run(self._set_health_async(status))

    def start(self) -> None:
        if self.config.metrics_port:
            self._metrics_server, port = metrics.start_metrics_server(
                self.config.metrics_port, self.config.host)
            log.info("metrics on http://%s:%d/metrics", self.config.host, port)
        self.loop.run(self.grpc_server.start())
        log.info("longscribe listening on %s:%d", self.config.host, self.port)
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()

    def _load_model(self) -> None:
        try:
            # Imported here: torch and whisper take seconds to import, the port opens first.
            from longscribe.service.engines import create_engine
            from longscribe.service.segment import warm_up as warm_up_segmenter

            started = time.monotonic()
            self.engine = create_engine(self.config)
            self.engine.on_failure = lambda _message: self._set_health(  # a dead CUDA context
                health_pb2.HealthCheckResponse.NOT_SERVING)
            self.engine.start()
            warm_up_segmenter()  # before SERVING too: the first job is as fast as the second
            self.manager.start(self.engine)
            from longscribe.service.live.job import ManagerJobs
            from longscribe.service.live.runtime import LiveRuntime

            self.live = LiveRuntime.from_config(self.engine, self.config,
                                                ManagerJobs(self.manager))
            self.servicer.live = self.live  # TranscribeLive is UNAVAILABLE until now
            log.info("model ready in %.1f s: %s engine, %s", time.monotonic() - started,
                     self.engine.name, self.engine.backend.describe())
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        except BaseException as exc:  # noqa: BLE001 - reported, then the process exits
            log.exception("could not load the model")
            self.model_error = exc
        finally:
            self.ready.set()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, stop running jobs so they resume on restart, free everything."""
        self.loop.run(self.health.enter_graceful_shutdown())
        if self.live is not None:
            self.live.stop()  # live sessions end (their jobs get what they transcribed)
        self.manager.shutdown(timeout=grace)
        self.loop.run(self.grpc_server.stop(grace))
        self.loop.close()
        if self.engine is not None:
            # A batch in flight cannot be interrupted; its thread is a daemon, so don't wait long.
            self.engine.stop(timeout=1.0)
        if self._metrics_server is not None:
            metrics.stop_metrics_server(self._metrics_server)
        self.store.close()
        self.lock.release()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _exit(code: int) -> NoReturn:
    """Leave without interpreter finalisation: a daemon thread still inside torch's native code
    (a batch of a job that was just stopped) would otherwise abort the process at exit. Every
    resource of ours is released by then: jobs checkpointed, children killed, database closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(config: config_module.Config) -> NoReturn:
    """Run until SIGTERM or SIGINT, then exit the process: 0 after a clean stop, 1 if the model
    could not be loaded. May first re-execute the process (same pid) to preload jemalloc."""
    memory.use_allocator(config.allocator)
    setup_logging(config.log_level)
    memory.tune_malloc()  # before any worker thread exists
    log.info("memory allocator: %s", memory.allocator_name())
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` dumps every thread's stack
    try:
        server = LongscribeServer(config)
    except DataDirBusy as exc:
        log.error("%s", exc)
        _exit(1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    while not stop.wait(0.5):
        if server.ready.is_set() and server.model_error is not None:
            server.stop(grace=1.0)
            _exit(1)
    log.info("shutting down")
    # Exiting while the loader thread is inside torch's native code aborts the process.
    server.ready.wait(60.0)
    server.stop()
    log.info("stopped")
    _exit(0)


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="longscribe serve", description=__doc__)
    config_module.add_arguments(parser)
    serve(config_module.from_namespace(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
