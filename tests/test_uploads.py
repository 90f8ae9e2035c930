"""Uploads: streamed to disk, limited, never empty, safely named, cleaned up on failure."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from longscribe.service.errors import JobError
from longscribe.service.uploads import UploadWriter, sanitize_filename


def test_chunks_are_written_as_they_arrive(tmp_path: Path) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(3)] + [b"tail"]
    with UploadWriter(tmp_path, "talk.m4a", max_bytes=10 << 20) as upload:
        for i, chunk in enumerate(chunks):
            upload.write(chunk)
            # on disk already, before the upload ends (not buffered whole in memory)
            expected = sum(len(c) for c in chunks[: i + 1])
            assert upload.size == expected
            assert upload.path.stat().st_size >= expected - (1 << 20)
    assert upload.path.parent == tmp_path and upload.path.suffix == ".m4a"
    assert upload.path.read_bytes() == b"".join(chunks)


def test_limit_is_enforced_and_partial_file_removed(tmp_path: Path) -> None:
    with pytest.raises(JobError) as info, UploadWriter(tmp_path, "a.wav", max_bytes=1000) as up:
        up.write(b"x" * 600)
        up.write(b"x" * 600)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1,000 bytes" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_exactly_the_limit_is_fine(tmp_path: Path) -> None:
    with UploadWriter(tmp_path, "a.wav", max_bytes=1000) as up:
        up.write(b"x" * 1000)
    assert up.path.stat().st_size == 1000


def test_empty_upload_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(JobError) as info, UploadWriter(tmp_path, "a.wav", max_bytes=0):
        pass
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "the upload was empty"
    assert list(tmp_path.iterdir()) == []


def test_any_error_or_abort_removes_the_partial_file(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError), UploadWriter(tmp_path, "a.wav", max_bytes=0) as up:
        up.write(b"partial")
        raise ConnectionError("client went away")
    with UploadWriter(tmp_path, "b.wav", max_bytes=0) as up2:
        up2.write(b"data")
        up2.abort()
    assert list(tmp_path.iterdir()) == []


def test_low_disk_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobError) as info, UploadWriter(
        tmp_path, "a.wav", max_bytes=0, min_free_bytes=1 << 60
    ) as up:
        up.write(b"x")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "given, expected",
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\talk.M4A", "talk.m4a"),
        ("a b/c d.mp3", "c_d.mp3"),
        (".hidden.wav", "hidden.wav"),
        ("", "upload"),
        ("..", "upload"),
        ("na\x00me;rm -rf.ogg", "na_me_rm_-rf.ogg"),
        ("Réunion 東京 — été.MP3", "Réunion_東京_été.mp3"),
        ("Cafe\u0301.wav", "Café.wav"),  # NFC: one é, not e + combining accent
    ],
)
def test_sanitised_names(given: str, expected: str) -> None:
    assert sanitize_filename(given) == expected


def test_long_names_are_bounded_and_names_never_collide(tmp_path: Path) -> None:
    assert len(sanitize_filename("x" * 500 + ".webm").encode()) <= 200
    paths = []
    for _ in range(2):
        with UploadWriter(tmp_path, "../same.mp3", max_bytes=0) as up:
            up.write(b"1")
        paths.append(up.path)
    assert paths[0] != paths[1] and all(p.parent == tmp_path for p in paths)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_client_name_becomes_a_safe_one(name: str) -> None:
    safe = sanitize_filename(name)
    assert re.fullmatch(r"[^\W_][\w.-]*", safe), safe
    assert ".." not in safe.split(".")[0] and len(safe.encode()) <= 200
    assert PurePosixPath(safe).name == safe
