"""``annotator doctor``: its inotify line and a first start's bundle.

The inotify line: the drop folder's folders (one watch each for the daemon; ``processed/`` and
``quarantine/`` not watched) against the user's limit, which the daemon otherwise meets only at
run time (then it finds files by its full walks only)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from service.doctor import FAIL, OK, SKIP, WARN, check_watches


def _drop(tmp_path: Path, recordings: int) -> SimpleNamespace:
    drop = tmp_path / "drop"
    for i in range(recordings):
        (drop / "cam0" / f"s{i}").mkdir(parents=True)
    for i in range(50):  # mirrored recordings: no watch
        (drop / "processed" / "cam0" / f"old{i}").mkdir(parents=True)
    (drop / "quarantine").mkdir()
    return SimpleNamespace(drop=SimpleNamespace(folder=drop))


@pytest.mark.parametrize("recordings, limit, level", [(8, 100, OK), (60, 100, WARN), (120, 100, FAIL)])
def test_the_drop_folders_folders_are_counted_against_the_watch_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      recordings: int, limit: int, level: str) -> None:
    monkeypatch.setattr("service.dropfolder.inotify_watch_limit", lambda: limit)
    check = check_watches(_drop(tmp_path, recordings))
    folders = recordings + 2  # the drop folder and cam0 too
    assert check.level == level, check
    assert f"{folders} folders to watch" in check.detail and f"max_user_watches {limit}" in check.detail
    if level != OK:
        assert "sysctl fs.inotify.max_user_watches" in check.advice and "remove_empty_hours" in check.advice


def test_no_drop_folder_or_no_limit_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_watches(SimpleNamespace(drop=SimpleNamespace(folder=None))).level == SKIP
    monkeypatch.setattr("service.dropfolder.inotify_watch_limit", lambda: None)
    assert check_watches(_drop(tmp_path, 1)).level == SKIP


def test_a_models_current_link_not_made_yet_says_models_adopt(tmp_path: Path) -> None:
    """``engine.bundle = ".../models/current"`` (the example config's) before any bundle was
    installed: the advice was "point engine.bundle at a complete bundle directory"; the step a
    first start misses is ``annotator models adopt``."""
    from service.doctor import check_bundle

    cfg = SimpleNamespace(engine=SimpleNamespace(bundle=tmp_path / "store" / "models" / "current",
                                                 bundle_public_key=None))
    check = check_bundle(cfg)
    assert check.level == FAIL and "no bundle was installed" in check.detail
    assert "annotator models adopt BUNDLE_DIR" in check.advice


def test_hidden_folders_are_counted_they_are_watched_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch covers every folder but processed/ and quarantine/, hidden ones (a desktop's
    ``.Trash-1000``) included: the count left them out (3 folders said, 34 watches held)."""
    cfg = _drop(tmp_path, 1)
    for i in range(30):
        (cfg.drop.folder / ".Trash-1000" / "files" / f"f{i}").mkdir(parents=True)
    monkeypatch.setattr("service.dropfolder.inotify_watch_limit", lambda: 1000)
    assert "35 folders to watch" in check_watches(cfg).detail
