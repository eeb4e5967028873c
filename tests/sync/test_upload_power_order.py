"""Power cuts, not kills: an image is marked uploaded only once the bucket holds it durably.

For the local-folder bucket (``[sync.target] kind = "local"``, a folder on a USB disk or a share)
"holds it durably" means: the object fsynced, renamed into place, its folder fsynced, and every
folder made for it fsynced in its parent (the first upload makes ``images/``,
``preannotations/<appliance>/`` and ``manifests/<appliance>/``), all before the store's mark.
The calls are recorded in the process (``os.fsync``, ``os.replace`` and the store's
``set_state`` wrapped). A trace of a real ``annotator sync --once`` shows the same order, SQLite's
own fdatasync of the store's -wal after the bucket's last folder fsync.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.store import UPLOADED
from sync.objectstore import LocalFolderStore
from sync.uploader import Uploader, UploadSettings

from reviewdata import fill_store


def _record(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, str]]) -> None:
    fsync, replace = os.fsync, os.replace

    def rec_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def rec_replace(a, b, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        calls.append(("rename", os.fspath(b)))
        replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "replace", rec_replace)


def test_a_first_put_into_a_fresh_bucket_folder_syncs_the_folders_it_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD fsynced only ``edge/images`` (the object's own folder): the entries of the folders
    made for it (``edge/images`` in ``edge``, ``edge`` in the bucket) were left to the file system,
    while the uploader marked the image uploaded right after."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    calls: list[tuple[str, str]] = []
    _record(monkeypatch, calls)
    LocalFolderStore(bucket, "edge").put("images/abc.jpg", b"\xff\xd8\xff data")
    synced = [p for c, p in calls if c == "fsync"]
    for folder in (bucket, bucket / "edge", bucket / "edge" / "images"):
        assert str(folder) in synced, synced


def test_an_image_is_marked_uploaded_after_its_objects_and_the_manifest_are_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=2)
    bucket = tmp_path / "bucket"
    calls: list[tuple[str, str]] = []
    set_state = store.set_state

    def rec_set_state(image_id: str, *args, **kw):  # type: ignore[no-untyped-def]
        if len(args) > 1 and args[1] == UPLOADED:
            calls.append(("mark", image_id))
        return set_state(image_id, *args, **kw)

    monkeypatch.setattr(store, "set_state", rec_set_state)
    _record(monkeypatch, calls)
    uploader = Uploader(store, LocalFolderStore(bucket, "edge"), UploadSettings("box-1", batch_size=2))
    while uploader.run_once():
        pass
    marks = [i for i, (c, _) in enumerate(calls) if c == "mark"]
    assert len(marks) == 2 and all(store.get(i).state == UPLOADED for i in review)
    renames = [(i, p) for i, (c, p) in enumerate(calls) if c == "rename" and p.startswith(str(bucket))]
    assert len(renames) == 5  # 2 images, 2 pre-annotations, 1 manifest
    for i, path in renames:  # each object's folder fsynced after its rename and before any mark
        after = [j for j, (c, p) in enumerate(calls) if c == "fsync" and p == os.path.dirname(path) and j > i]
        assert after and after[0] < marks[0], (path, calls)


def test_an_undone_switch_makes_the_pointers_durable_before_the_bundle_goes(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``ModelPuller._undo_switch`` restores the pointers and then removes the bundle it had
    switched to; the pointers were fsynced only later (``end_switch``), so a power cut in between
    left ``current`` naming a deleted bundle."""
    import sync.models as models

    slots = models.ModelSlots(tmp_path / "models")
    old, new = slots.root / "bundles" / "old", slots.root / "bundles" / "new"
    old.mkdir()
    new.mkdir()
    slots.restore((new, None))
    synced: list[Path] = []
    monkeypatch.setattr(models, "fsync_dir", lambda folder: synced.append(Path(folder)))
    slots.restore((old, None))
    assert slots.current_path() == old.resolve()
    assert synced == [slots.root]  # HEAD: [] (the pointers' renames not on disk yet)
