"""The committed generated code must match the .proto (run `make proto` after editing it)."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "longscribe/v1/transcription.proto"
GENERATED = ["transcription_pb2.py", "transcription_pb2_grpc.py", "transcription_pb2.pyi"]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{include}",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
        str(ROOT / "protos" / PROTO),
    ])
    assert code == 0
    for name in GENERATED:
        fresh = (tmp_path / "longscribe" / "v1" / name).read_text()
        committed = (ROOT / "protos" / "longscribe" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_service_name_is_stable() -> None:
    from longscribe.v1 import transcription_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["TranscriptionService"]
    assert service.full_name == "longscribe.v1.TranscriptionService"
    assert {m.name for m in service.methods} == {
        "SubmitJob", "UploadAndSubmit", "WatchJob", "Transcribe", "GetJob", "ListJobs",
        "CancelJob", "TranscribeLive",
    }
