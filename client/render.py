"""Human-readable text for jobs and events (the CLI's non-JSON output)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timezone

from google.protobuf.timestamp_pb2 import Timestamp
from longscribe.v1 import transcription_pb2 as pb

from .client import state_name
from .progress import phase_label, speed_text


def timestamp_text(ts: Timestamp) -> str:
    """Local time, to the second; "-" for an unset timestamp."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def clock(seconds: float) -> str:
    """1:02:03.450 / 02:03.450: media times, to the millisecond."""
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h}:{m:02d}:{s:02d}.{ms:03d}" if h else f"{m:02d}:{s:02d}.{ms:03d}"


def jobs_table(jobs: Iterable[pb.Job]) -> str:
    """A compact table, one job per line, columns sized to their contents."""
    rows = [("JOB ID", "STATE", "DONE", "CREATED", "SOURCE")]
    for job in jobs:
        rows.append(
            (
                job.job_id,
                state_name(job.state),
                f"{job.progress.percent:.0f}%",
                timestamp_text(job.create_time),
                job.source,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if i == 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def job_details(job: pb.Job) -> str:
    """The fields a person looks at, one per line; the transcript last when the job has one."""
    fields: list[tuple[str, str]] = [
        ("job", job.job_id),
        ("state", state_name(job.state)),
        ("source", job.source),
        ("created", timestamp_text(job.create_time)),
        ("updated", timestamp_text(job.update_time)),
    ]
    p = job.progress
    progress = f"{p.percent:.0f}%"
    if p.audio_seconds_total:
        progress += f" ({p.audio_seconds_done:.0f} of {p.audio_seconds_total:.0f} s audio)"
    fields.append(("progress", progress))
    if job.chunks_total:
        fields.append(
            ("chunks", f"{job.chunks_done} of {job.chunks_total} ({job.chunks_reused} reused)")
        )
    if job.duration_seconds:
        fields.append(("duration", f"{job.duration_seconds:.1f} s"))
    o = job.options
    opts = [
        f"{k}={v!r}"
        for k, v in (("language", o.language), ("task", o.task), ("prompt", o.initial_prompt))
        if v
    ]
    if opts:
        fields.append(("options", " ".join(opts)))
    if job.request_id:
        fields.append(("request id", job.request_id))
    fields.append(("events", str(job.event_count)))
    if job.HasField("error"):
        fields.append(("error", f"{job.error.code_name}: {job.error.message}"))
    width = max(len(name) for name, _ in fields) + 1
    text = "\n".join(f"{name + ':':<{width}} {value}" for name, value in fields)
    if job.HasField("result"):
        transcript = job.result.formats.txt or job.result.text
        text += "\n\n" + transcript.rstrip("\n")
    return text


def event_line(event: pb.JobEvent) -> str:
    """One line per event: "#12 transcribing 42% 120/600 s audio, ×35.0 real time"."""
    head = f"#{event.index}"
    kind = event.WhichOneof("event")
    if kind == "progress":
        p = event.progress
        parts = [head, phase_label(p.phase or event.state), f"{p.percent:.0f}%"]
        if p.bytes_total or p.bytes_done:
            parts.append(f"{p.bytes_done}/{p.bytes_total or '?'} bytes")
        if p.audio_seconds_total or p.audio_seconds_done:
            parts.append(f"{p.audio_seconds_done:.1f}/{p.audio_seconds_total:.1f} s audio")
        if p.chunk_count:
            parts.append(f"chunk {p.chunk_index}/{p.chunk_count}")
        if extra := speed_text(p):
            parts.append(extra)
        if p.message:
            parts.append(f"- {p.message}")
        return " ".join(parts)
    if kind == "segment":
        s = event.segment
        return f"{head} [{clock(s.start)} --> {clock(s.end)}] {s.text.strip()}"
    if kind == "result":
        r = event.result
        lang = f", language {r.language}" if r.language else ""
        return f"{head} result: {r.duration_seconds:.1f} s audio, {len(r.segments)} segments{lang}"
    if kind == "error":
        return f"{head} error: {event.error.code_name}: {event.error.message}"
    return f"{head} {state_name(event.state)}"
