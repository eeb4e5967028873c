"""The drop folder's "paused" warning while the store's disk is below its floor (daemon-life
audit): the store's reason names the free space, which changes on a disk others write to, and
each scan (every ``drop.poll_interval``) logged the pause again: 79 warnings in 35 s from a real
``annotator serve`` with ``store.min_free_mb`` above the free space. Now once per kind of reason."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from service.dropfolder import DropFolder


def test_the_pause_is_logged_once_while_the_free_space_in_its_reason_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    free = itertools.count(70948, -3)
    reason = {"text": ""}

    def paused() -> str | None:
        reason["text"] = f"free disk space {next(free)} MB below the floor of 1000 MB on {tmp_path}"
        return reason["text"]

    folder = DropFolder(tmp_path / "drop", lambda *a: None, paused=paused)
    with caplog.at_level(logging.WARNING, logger="service.dropfolder"):
        for _ in range(20):
            assert folder.scan_once() == 0
    paused_lines = [r.getMessage() for r in caplog.records if "drop folder paused" in r.getMessage()]
    assert len(paused_lines) == 1, paused_lines  # HEAD: 20, one per scan
    assert "70948 MB" in paused_lines[0]
