"""The committed generated gRPC modules match the .proto files (regenerated into tmp_path)."""
from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import PROTO_FILES, ROOT, generate


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (test extra)")
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    stale = [str(f.relative_to(tmp_path)) for f in fresh
             if (ROOT / f.relative_to(tmp_path)).read_bytes() != f.read_bytes()]
    assert not stale, f"{stale} are stale: run `python -m protos.generate` and commit the result"


def test_generated_modules_import_as_a_package() -> None:
    from protos.annotator.v1 import annotator_pb2, annotator_pb2_grpc

    assert annotator_pb2.DESCRIPTOR.package == "annotator.v1"
    assert annotator_pb2.DESCRIPTOR.name == PROTO_FILES[0]
    assert hasattr(annotator_pb2_grpc, "AnnotatorServicer")
