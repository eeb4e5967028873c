"""Shared by the upgrade tests: a store written by an old release, copied per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "release-31c2004"


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the store that release 31c2004's own CLI wrote (every state: fixture.json)."""
    root = tmp_path / "store"
    shutil.copytree(FIXTURE / "store", root)
    return root
