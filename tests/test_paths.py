"""Server paths stay inside the media root."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from longscribe.service.errors import JobError
from longscribe.service.paths import resolve_media_path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "media"
    (root / "talks").mkdir(parents=True)
    (root / "talks" / "a.mp3").write_bytes(b"ID3 not really")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    return root, outside


def _code(root: Path | str, relative: str) -> grpc.StatusCode:
    with pytest.raises(JobError) as info:
        resolve_media_path(root, relative)
    return info.value.code


def test_good_file_resolves(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    path = resolve_media_path(root, "talks/a.mp3")
    assert path == (root / "talks" / "a.mp3").resolve() and path.read_bytes().startswith(b"ID3")
    # a link that stays inside the root is fine, and resolves to its target
    (root / "inside-link.mp3").symlink_to(root / "talks" / "a.mp3")
    assert resolve_media_path(str(root), "inside-link.mp3") == path


def test_disabled_without_media_root() -> None:
    with pytest.raises(JobError) as info:
        resolve_media_path("", "a.mp3")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--media-root" in info.value.message


@pytest.mark.parametrize(
    "relative", ["../secret.txt", "talks/../../secret.txt", "..\\secret.txt", "talks/../../nope"]
)
def test_dotdot_escapes_are_denied(layout: tuple[Path, Path], relative: str) -> None:
    root, _ = layout
    assert _code(root, relative) == grpc.StatusCode.PERMISSION_DENIED


def test_absolute_paths_are_denied(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    assert _code(root, str(outside)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(root, "/etc/passwd") == grpc.StatusCode.PERMISSION_DENIED
    # even an absolute path that happens to lie inside the root: the API takes relative ones
    assert _code(root, str(root / "talks" / "a.mp3")) == grpc.StatusCode.PERMISSION_DENIED


def test_symlinks_out_of_the_root_are_denied(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "link.txt").symlink_to(outside)
    (root / "dirlink").symlink_to(outside.parent)
    (root / "dangling").symlink_to(outside.parent / "missing.mp3")
    assert _code(root, "link.txt") == grpc.StatusCode.PERMISSION_DENIED
    assert _code(root, "dirlink/secret.txt") == grpc.StatusCode.PERMISSION_DENIED
    # refused, not NOT_FOUND: the answer must not reveal what exists outside the root
    assert _code(root, "dangling") == grpc.StatusCode.PERMISSION_DENIED


def test_missing_directory_and_odd_names(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    assert _code(root, "talks/nope.mp3") == grpc.StatusCode.NOT_FOUND
    assert _code(root, "talks") == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(root, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(root, "a\x00b") == grpc.StatusCode.INVALID_ARGUMENT
    os.mkfifo(root / "pipe")
    assert _code(root, "pipe") == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(root.parent / "no-such-root", "a.mp3") == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "media"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f.mp3").write_bytes(b"x")
    (base / "outside.mp3").write_bytes(b"secret")
    (root / "out").symlink_to(base)
    (root / "in").symlink_to(root / "a")
    return root


@given(st.lists(st.sampled_from(["a", "f.mp3", "..", ".", "out", "in", "outside.mp3", "", "\\",
                                 "/", "\x00", "~", "%2e%2e"]), min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_random_paths_never_escape(fuzz_root: Path, parts: list[str]) -> None:
    relative = "/".join(parts)
    try:
        path = resolve_media_path(fuzz_root, relative)
    except JobError as e:
        assert e.code in {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                          grpc.StatusCode.INVALID_ARGUMENT}
        return
    assert path.is_file() and path.is_relative_to(fuzz_root.resolve())


def test_error_messages_lose_server_paths(tmp_path: Path) -> None:
    from longscribe.service.errors import redact_paths

    data = tmp_path / "data"
    data.mkdir()
    link = tmp_path / "link"
    link.symlink_to(data)
    roots = (str(link), "")
    assert redact_paths(f"media file not found: {data}/jobs/j1/upload/talk.mp3", roots) == \
        "media file not found: talk.mp3"
    assert redact_paths(f"cannot decode '{link}/jobs/j1/notes.mp3': bad", roots) == \
        "cannot decode 'notes.mp3': bad"
    assert redact_paths("no file 'a.mp3' under the media root", roots) == \
        "no file 'a.mp3' under the media root"
