"""The contracts: buf lint is clean and the checked-in generated code matches the protos."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from plumbing import protogen

REPO = Path(__file__).resolve().parent.parent


def test_buf_lint_passes() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    fresh = tmp_path / "rallyrobopilot" / "v1"
    checked_in = REPO / "rallyrobopilot" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in checked_in.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    _, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
    assert not mismatch and not errors, f"run `make protos`: {mismatch or errors} drifted from protos/"


def test_installed_contracts_match_protos(tmp_path: Path) -> None:
    """The modules Python actually imports carry the descriptors that protoc builds from protos/ now."""
    import importlib

    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p) for p in protogen.proto_files()]
    assert (
        protoc.main(["protoc", f"-I{protogen.PROTO_ROOT}", f"-I{include}", f"--descriptor_set_out={out}", *files]) == 0
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(compiled.file) == len(files)
    for fd in compiled.file:
        _strip_json_names(fd.message_type)  # protoc adds them to descriptor sets, not to generated modules
        module = importlib.import_module(fd.name.removesuffix(".proto").replace("/", ".") + "_pb2")
        installed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert installed == fd, f"{module.__file__} drifted from {fd.name}: run `make protos` and reinstall"


def _strip_json_names(messages) -> None:  # type: ignore[no-untyped-def]
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)
