"""The `longscribe` command: transcribe, jobs list|get|watch|cancel, serve.

Every client flag has a LONGSCRIBE_* environment variable as its default. `serve` imports the
server packages only when it runs, so the client-only install can show help and talk to a
server without torch or whisper."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from longscribe import __version__
from longscribe.v1 import transcription_pb2 as pb

from .client import DEFAULT_TARGET, LongscribeClient, make_options, state_name, state_value
from .errors import LongscribeError, status_code
from .live import add_parser as add_live_parser
from .output import FORMATS, transcript_text, write_transcript
from .progress import MODES, make_progress
from .render import event_line, job_details, jobs_table

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130

EXIT_HELP = """\
exit status:
  0    success
  1    the job failed, or the server refused the request (the status code is printed)
  2    usage error (bad flags, a source that is neither a file nor a URL)
  3    the job was cancelled
  4    cannot reach the server (UNAVAILABLE)
  130  interrupted with Ctrl-C (transcribe cancels its job first, unless --detach)"""

SERVER_EXTRA = "the server needs the 'server' extra: pip install 'longscribe[server]'"


def exit_code(code: grpc.StatusCode, *, job: bool = False) -> int:
    """The process exit status for a failure with this gRPC status code; `job`: the job ended
    with it (a media URL the server could not reach is the job's failure, exit 1, not 4)."""
    if code == grpc.StatusCode.CANCELLED:
        return EXIT_CANCELLED
    if code == grpc.StatusCode.UNAVAILABLE and not job:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("LONGSCRIBE_" + name, default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


def _env_seconds(name: str, default: float) -> float:
    text = _env(name)
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"LONGSCRIBE_{name} must be a number of seconds, not {text!r}") from None


def _json_line(message: object) -> str:
    return json_format.MessageToJson(message, indent=None)  # type: ignore[arg-type]


class _CallbackHandler(logging.Handler):
    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        self._write(f"longscribe: {record.getMessage()}")


@contextlib.contextmanager
def _client_log(write: Callable[[str], None]) -> Iterator[None]:
    """Show the client library's notices (reconnects) through `write`, e.g. above the bars."""
    logger = logging.getLogger("longscribe.client")
    handler = _CallbackHandler(write)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- commands ------------------------------------------------------------------------------


def _transcribe_problem(ns: argparse.Namespace) -> str | None:
    """Why a transcribe request cannot start, found before any job is made (None: it can)."""
    # argparse checks `choices` on flags, not on defaults taken from the environment.
    for value, allowed, env in (
        (ns.format, FORMATS, "FORMAT"),
        (ns.progress, MODES, "PROGRESS"),
        (ns.task, ("transcribe", "translate", None), "TASK"),
    ):
        if value not in allowed:
            names = ", ".join(a for a in allowed if a)
            return f"LONGSCRIBE_{env}={value!r} is not one of {names}"
    if ns.output and not Path(ns.output).expanduser().resolve().parent.is_dir():
        return f"cannot write {ns.output!r}: its folder does not exist"
    source: str = ns.source
    if ns.server_path or Path(source).is_file():
        return None
    if source.lower().startswith(("http://", "https://")):
        return None
    if Path(source).exists():
        return f"{source!r} is not a regular file"
    return f"{source!r} is neither an existing local file nor an http(s) URL"


def cmd_transcribe(ns: argparse.Namespace, client: LongscribeClient) -> int:
    options = make_options(ns.language, ns.task, ns.prompt)
    mode = "off" if ns.no_progress else ns.progress
    view = make_progress(mode, sys.stderr)
    job_id = ""

    def started(job: pb.Job) -> None:
        nonlocal job_id
        job_id = job.job_id  # remembered so Ctrl-C can cancel it
        view.message(f"longscribe: job {job_id}")

    try:
        with view, _client_log(view.message):
            if ns.detach:
                job = client.submit(
                    ns.source,
                    options=options,
                    request_id=ns.request_id,
                    server_path=ns.server_path,
                    on_upload=view.on_upload,
                )
                print(job.job_id)
                return EXIT_OK
            result = client.transcribe(
                ns.source,
                options=options,
                request_id=ns.request_id,
                server_path=ns.server_path,
                on_event=view.on_event,
                on_upload=view.on_upload,
                on_job=started,
            )
    except KeyboardInterrupt:
        if job_id and not ns.detach:
            try:
                client.cancel(job_id)
                print(f"longscribe: interrupted; cancelled job {job_id}", file=sys.stderr)
            except LongscribeError as err:
                print(
                    f"longscribe: interrupted; could not cancel job {job_id}: "
                    f"{err.code_name}: {err.message}",
                    file=sys.stderr,
                )
        else:
            print("longscribe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    write_transcript(transcript_text(result, ns.format), ns.output)
    return EXIT_OK


def cmd_list(ns: argparse.Namespace, client: LongscribeClient) -> int:
    jobs = client.list(states=ns.state or None)
    if ns.json:
        for job in jobs:
            print(_json_line(job), flush=True)
    else:
        print(jobs_table(jobs))
    return EXIT_OK


def cmd_get(ns: argparse.Namespace, client: LongscribeClient) -> int:
    job = client.get(ns.job_id, include_result=ns.result or bool(ns.format))
    if ns.format:  # the transcript alone, in that format
        if not job.HasField("result"):
            print(f"error: job {job.job_id} has no transcript ({state_name(job.state)})",
                  file=sys.stderr)
            return EXIT_FAILED
        sys.stdout.write(getattr(job.result.formats, ns.format))
        return EXIT_OK
    print(json_format.MessageToJson(job) if ns.json else job_details(job))
    return EXIT_OK


def cmd_watch(ns: argparse.Namespace, client: LongscribeClient) -> int:
    terminal: pb.JobEvent | None = None
    with _client_log(_stderr_line):
        for event in client.watch(ns.job_id, from_index=ns.from_index):
            print(_json_line(event) if ns.json else event_line(event), flush=True)
            if event.WhichOneof("event") in ("result", "error"):
                terminal = event
    if terminal is None:  # --from past the job's end: its outcome is in the job itself
        job = client.get(ns.job_id)
        failed = job.HasField("error") and job.state != pb.JOB_STATE_SUCCEEDED
        return exit_code(status_code(job.error.code), job=True) if failed else EXIT_OK
    if terminal.HasField("error"):
        return exit_code(status_code(terminal.error.code), job=True)
    return EXIT_OK


def cmd_cancel(ns: argparse.Namespace, client: LongscribeClient) -> int:
    job = client.cancel(ns.job_id)
    if ns.json:
        print(json_format.MessageToJson(job))
    else:
        print(f"{job.job_id}: cancel requested (state {state_name(job.state)})")
    return EXIT_OK


def run_serve(argv: Sequence[str]) -> int:
    """`longscribe serve`: the server's own flags, each with its LONGSCRIBE_* default."""
    try:
        from longscribe.service import config as cfg
        from longscribe.service import server
    except ModuleNotFoundError as exc:
        # Our own missing module is a bug to show; a missing third-party one means no extra.
        if (exc.name or "").split(".")[0] == "longscribe":
            raise
        print(f"error: {SERVER_EXTRA} (missing module {exc.name!r})", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog="longscribe serve",
        description="Run the longscribe gRPC transcription server until SIGTERM or SIGINT.",
    )
    cfg.add_arguments(parser)
    config = cfg.from_namespace(parser.parse_args(argv))
    try:
        status = server.serve(config)  # returns when SIGTERM/SIGINT stops it
    except ValueError as exc:  # bad configuration found at start-up (TLS files, tokens…)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status if isinstance(status, int) else EXIT_OK


# -- argument parsing ----------------------------------------------------------------------


def _connection_flags() -> argparse.ArgumentParser:
    """Flags every command that talks to a server shares."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=_env("SERVER", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help="server address [env LONGSCRIBE_SERVER; default %(default)s]",
    )
    group.add_argument(
        "--token",
        default=_env("TOKEN"),
        help="bearer token sent as 'authorization' metadata [env LONGSCRIBE_TOKEN]",
    )
    group.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=_env_flag("TLS"),
        help="use TLS with the system's trusted roots [env LONGSCRIBE_TLS]",
    )
    group.add_argument(
        "--tls-ca",
        default=_env("TLS_CA"),
        metavar="PEM",
        help="CA bundle that signed the server's certificate; implies --tls "
        "[env LONGSCRIBE_TLS_CA]",
    )
    # Not LONGSCRIBE_TLS_CERT/KEY: those are the server's own certificate flags.
    group.add_argument(
        "--client-cert",
        default=_env("CLIENT_CERT"),
        metavar="PEM",
        help="client certificate for mutual TLS [env LONGSCRIBE_CLIENT_CERT]",
    )
    group.add_argument(
        "--client-key",
        default=_env("CLIENT_KEY"),
        metavar="PEM",
        help="its private key [env LONGSCRIBE_CLIENT_KEY]",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=_env_seconds("TIMEOUT", 30.0),
        metavar="SECONDS",
        help="deadline of short calls (submit, get, list, cancel) [env LONGSCRIBE_TIMEOUT; "
        "default %(default)s]",
    )
    group.add_argument(
        "--wait",
        type=float,
        default=_env_seconds("WAIT", 0.0),
        metavar="SECONDS",
        help="wait this long for a server that is still starting [env LONGSCRIBE_WAIT; "
        "default 0: fail at once]",
    )
    return parent


def _state_arg(text: str) -> int:
    try:
        return state_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_transcribe(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "transcribe",
        parents=[conn],
        help="transcribe a local file or a URL",
        description="Transcribe SOURCE: a local file (uploaded) or an http(s) URL (fetched\n"
        "by the server). Progress goes to stderr, the transcript to stdout or -o FILE.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="local media file or http(s) URL")
    p.add_argument(
        "--format",
        "-f",
        choices=FORMATS,
        default=_env("FORMAT", "txt"),
        help="transcript format [env LONGSCRIBE_FORMAT; default %(default)s]",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write the transcript here")
    p.add_argument(
        "--language",
        default=_env("LANGUAGE"),
        help="ISO 639-1 code, e.g. en (default: detect) [env LONGSCRIBE_LANGUAGE]",
    )
    p.add_argument(
        "--task",
        choices=("transcribe", "translate"),
        default=_env("TASK"),
        help="translate: into English [env LONGSCRIBE_TASK]",
    )
    p.add_argument("--prompt", help="text to condition the first window on (names, spelling)")
    p.add_argument("--request-id", help="idempotency key: resubmitting it returns the same job")
    p.add_argument(
        "--server-path",
        action="store_true",
        help="SOURCE is a path under the server's media root, not a local file",
    )
    p.add_argument(
        "--progress",
        choices=MODES,
        default=_env("PROGRESS", "auto"),
        help="auto: bars on a terminal, plain lines otherwise [env LONGSCRIBE_PROGRESS]",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        default=_env_flag("NO_PROGRESS"),
        help="no progress output (same as --progress off) [env LONGSCRIBE_NO_PROGRESS]",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="only submit: print the job id and exit (follow it with 'jobs watch')",
    )
    p.set_defaults(handler=cmd_transcribe)


def _add_jobs(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser(
        "jobs",
        help="list, inspect, follow or cancel jobs",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p = cmds.add_parser("list", parents=[conn], help="list jobs, newest first")
    p.add_argument(
        "--state",
        nargs="+",
        action="extend",
        type=_state_arg,
        metavar="STATE",
        help="only jobs in these states (queued, transcribing, succeeded, failed…)",
    )
    p.add_argument("--json", action="store_true", help="one protobuf-JSON Job per line")
    p.set_defaults(handler=cmd_list)

    p = cmds.add_parser("get", parents=[conn], help="show one job")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--result", action="store_true", help="include the transcript")
    p.add_argument("--format", choices=FORMATS,
                   help="print only the transcript, in this format (txt, srt, vtt, json)")
    p.add_argument("--json", action="store_true", help="the Job in protobuf JSON")
    p.set_defaults(handler=cmd_get)

    p = cmds.add_parser(
        "watch",
        parents=[conn],
        help="print a job's events until it ends",
        description="Print a job's events (replayed from --from) until it ends; exits with\n"
        "the job's outcome (see 'longscribe jobs --help'). Reconnects if the stream drops.",
    )
    p.add_argument("job_id", metavar="ID")
    p.add_argument(
        "--from",
        dest="from_index",
        type=int,
        default=0,
        metavar="N",
        help="first event index (default 0: replay everything)",
    )
    p.add_argument("--json", action="store_true", help="one protobuf-JSON JobEvent per line")
    p.set_defaults(handler=cmd_watch)

    p = cmds.add_parser("cancel", parents=[conn], help="ask the server to stop a job")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="the Job in protobuf JSON")
    p.set_defaults(handler=cmd_cancel)


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI except the server's flags (`serve` parses its own, lazily)."""
    parser = argparse.ArgumentParser(
        prog="longscribe",
        description="Batch transcription of long media over gRPC (OpenAI Whisper).",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"longscribe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_flags()
    _add_transcribe(sub, conn)
    _add_jobs(sub, conn)
    add_live_parser(sub, conn, EXIT_HELP)
    # Listed for --help only: main() hands `serve ...` to run_serve before parsing.
    sub.add_parser(
        "serve",
        add_help=False,
        help="run the server (needs the 'server' extra; 'longscribe serve --help' for flags)",
    )
    return parser


def _exit_status(code: object) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `longscribe` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["serve"]:
            return run_serve(args[1:])
        ns = build_parser().parse_args(args)
        if getattr(ns, "source", None) is not None and (problem := _transcribe_problem(ns)):
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return _exit_status(exc.code)
    except ValueError as err:  # a malformed LONGSCRIBE_* default, e.g. LONGSCRIBE_TIMEOUT=soon
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with LongscribeClient(
            ns.server,
            token=ns.token,
            tls=ns.tls or None,
            tls_ca=ns.tls_ca,
            tls_cert=ns.client_cert,
            tls_key=ns.client_key,
            timeout=ns.timeout,
        ) as client:
            if ns.wait > 0:
                client.wait_until_ready(ns.wait)
            return ns.handler(ns, client)
    except LongscribeError as err:
        print(f"error: {err.code_name}: {err.message}", file=sys.stderr)
        return exit_code(err.code, job=err.job_failed)
    except ValueError as err:  # unreadable TLS files, bad flag combinations
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("longscribe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `longscribe jobs list | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush doesn't raise again, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
