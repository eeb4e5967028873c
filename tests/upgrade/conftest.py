"""Shared by the upgrade tests: a store written by an old release, copied per test."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "release-31c2004"


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the store that release 31c2004's own CLI wrote (every state: fixture.json)."""
    root = tmp_path / "store"
    shutil.copytree(FIXTURE / "store", root)
    return root


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen]]:
    """Processes a test started, killed at its end if they still run (a stopped one too)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
