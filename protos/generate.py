"""Regenerate the committed gRPC/protobuf modules from the ``.proto`` files.

Run from the repository root (needs ``grpcio-tools``, pinned in the ``test`` extra)::

    python -m protos.generate            # rewrite protos/annotator/v1/*_pb2*.py in place

The proto path is given relative to the repository root (``-I .``), so the generated modules
import each other as ``protos.annotator.v1...``: they work from a checkout and after
``pip install .`` alike. ``tests/test_protos.py`` regenerates into a temporary folder and fails
when the committed files differ (stale).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/annotator/v1/annotator.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Run grpc_tools.protoc for every proto file; return the generated files under ``out_dir``."""
    from grpc_tools import protoc  # dev-only dependency
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *[str(root / p) for p in PROTO_FILES]]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out_dir / p.replace(".proto", suffix) for p in PROTO_FILES for suffix in GENERATED_SUFFIXES]


if __name__ == "__main__":
    files = generate(ROOT)
    sys.stdout.write("".join(f"wrote {f.relative_to(ROOT)}\n" for f in files))
