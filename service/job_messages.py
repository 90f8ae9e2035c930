"""Job rows as the API's protobuf messages (pb.Job, pb.Error, timestamps)."""

from __future__ import annotations

import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from longscribe.service.errors import bounded
from longscribe.service.store import JobRow
from longscribe.v1 import transcription_pb2 as pb


def timestamp(seconds: float | None = None) -> Timestamp:
    """`seconds` since the epoch (now when None) as a protobuf Timestamp."""
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if seconds is None else seconds) * 1e9))
    return ts


def error_message(code: grpc.StatusCode, message: str) -> pb.Error:
    return pb.Error(code=code.value[0], code_name=code.name, message=bounded(message))


def job_message(row: JobRow) -> pb.Job:
    message = pb.Job(
        job_id=row.job_id,
        state=row.state,
        source=f"{row.source_kind}:{row.source}",
        options=row.options,
        request_id=row.request_id or "",
        create_time=timestamp(row.created),
        update_time=timestamp(row.updated),
        event_count=row.event_count,
        chunks_total=row.chunks_total,
        chunks_done=row.chunks_done,
        chunks_reused=row.chunks_reused,
        duration_seconds=row.duration,
    )
    if row.progress is not None:
        message.progress.CopyFrom(row.progress)
    if row.error_code:
        code = next((c for c in grpc.StatusCode if c.value[0] == row.error_code),
                    grpc.StatusCode.UNKNOWN)
        message.error.CopyFrom(error_message(code, row.error_message))
    return message
