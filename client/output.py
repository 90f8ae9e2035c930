"""Turning a Result into the transcript the user asked for, and writing it out."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from longscribe.v1 import transcription_pb2 as pb

FORMATS = ("txt", "srt", "vtt", "json")


def transcript_text(result: pb.Result, fmt: str) -> str:
    """The transcript in `fmt`, as the server rendered it in Result.formats."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    text = getattr(result.formats, fmt)
    if not text and fmt == "txt":
        text = result.text  # a server that left formats.txt empty still sent the text
    return text


def _existing_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_transcript(text: str, path: str | Path | None, stdout: TextIO | None = None) -> None:
    """Write to `path`, or to stdout when path is None or "-". A file is written to a temporary
    name first and renamed, so a failed or interrupted run never leaves half a transcript."""
    if text and not text.endswith("\n"):
        text += "\n"
    if path is None or str(path) == "-":
        out = stdout if stdout is not None else sys.stdout
        out.write(text)
        out.flush()
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _existing_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
