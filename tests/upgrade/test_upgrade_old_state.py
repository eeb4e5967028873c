"""Upgrading in place: the state an older release left behind keeps working with this code.

The fixture ``fixtures/release-31c2004`` was written once by the release at commit 31c2004 (its
own daemon, merge and sync agent, run against a local folder standing in for the bucket), not
by this code: 10 images annotated (6 auto-accepted, 4 review-pending), the auto-accepted ones
merged into the dataset with that release's cursor (meta ``auto_cursor``), the sync agent killed
with ``kill -9`` right after its third object went up (an open batch: one image sent, one image
object written without its pre-annotation), then 4 more images dropped and the daemon killed with
``kill -9`` with one of them annotated and three still ``received``. The WAL files were
checkpointed into the databases afterwards (what the next open does anyway) to keep it small.
``fixture.json`` lists the image ids in drop order.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from service.store import AUTO_ACCEPTED, RECEIVED, REVIEW_PENDING, UPLOADED, Store
from sync.dataset import AUTO, Dataset
from sync.merge import Merger
from sync.objectstore import LocalFolderStore
from sync.uploader import Uploader, UploadSettings

FIXTURE = Path(__file__).parent / "fixtures" / "release-31c2004"
OLD_BUNDLE = "20261125T011335-3274a263"


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "appliance"
    shutil.copytree(FIXTURE, root)
    return root, json.loads((root / "fixture.json").read_text())["ids"]


class CountingFolder(LocalFolderStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key, data, *args, **kwargs):  # type: ignore[override]
        self.puts.append(key)
        return super().put(key, data, *args, **kwargs)


def test_old_store_opens_with_every_record_and_file(old: tuple[Path, list[str]]) -> None:
    root, ids = old
    store = Store(root / "store")
    try:
        rows = {i: store.get(i) for i in ids}
        assert all(r is not None for r in rows.values()), "an image of the old store is gone"
        states = Counter(r.state for r in rows.values())
        assert states == {AUTO_ACCEPTED: 6, REVIEW_PENDING: 5, RECEIVED: 3}
        for image_id, row in rows.items():
            assert hashlib.sha256(store.image_bytes(image_id)).hexdigest() == image_id
            assert row.pruned_at is None  # the column this code added to the old table
            if row.state != RECEIVED:
                assert row.record is not None and row.bundle_id == OLD_BUNDLE
                assert row.record["width"] == row.width and row.record["height"] == row.height
        assert sum(store.counts().get(s, 0) for s in (AUTO_ACCEPTED, REVIEW_PENDING, RECEIVED)) == 14
        # history kept: each annotated image entered ``annotated`` exactly once
        for image_id, row in rows.items():
            annotated = [h for h in store.history(image_id) if h[1] == "annotated"]
            assert len(annotated) == (0 if row.state == RECEIVED else 1)
    finally:
        store.close()


def test_images_the_killed_old_daemon_left_are_claimed_once(old: tuple[Path, list[str]]) -> None:
    root, ids = old
    later = time.time() + 3600  # the killed daemon's leases have expired
    store = Store(root / "store", clock=lambda: later)
    try:
        waiting = {i for i in ids if store.get(i).state == RECEIVED}
        assert len(waiting) == 3 and waiting <= set(ids[10:])
        claimed: list[str] = []
        while batch := store.claim("new-daemon", limit=8):
            claimed += [r.image_id for r in batch]
            for r in batch:
                store.fail(r.image_id, "new-daemon", "test: not annotated here")
        assert Counter(claimed) == Counter(waiting)  # each once, nothing the old daemon finished
    finally:
        store.close()


def test_upload_the_old_agent_left_in_flight_finishes_once(old: tuple[Path, list[str]]) -> None:
    root, ids = old
    before = {p.relative_to(root / "bucket").as_posix() for p in (root / "bucket").rglob("*") if p.is_file()}
    store = Store(root / "store")
    target = CountingFolder(root / "bucket")
    uploader = Uploader(store, target, UploadSettings("demo", batch_size=8))
    try:
        for _ in range(5):
            if not uploader.run_once():
                break
        assert not uploader.run_once()
        repeated = [k for k, n in Counter(target.puts).items() if n > 1]
        assert not repeated, f"objects put twice: {repeated}"
        assert not set(target.puts) & before, "an object the old release had put was put again"
        pending = [i for i in ids if store.get(i).state == REVIEW_PENDING]
        assert not pending
        uploaded = [i for i in ids if store.get(i).state == UPLOADED]
        assert len(uploaded) == 5
        lines = Counter()
        for manifest in (root / "bucket" / "manifests").rglob("*.manifest"):
            for text in manifest.read_text().splitlines():
                lines[json.loads(text)["image-id"]] += 1
        assert lines == Counter({i: 1 for i in uploaded})
        for image_id in uploaded:  # every manifest line names an object that is there
            meta = store.get(image_id).meta["upload"]
            assert target.head("images/" + meta["image"].rsplit("/images/", 1)[1]) is not None
    finally:
        uploader.close()
        store.close()


def test_dataset_of_the_old_release_merges_without_loss(old: tuple[Path, list[str]]) -> None:
    root, ids = old
    store = Store(root / "store")
    dataset = Dataset(root / "store" / "dataset")
    try:
        old_auto = {e.image_id for e in dataset.entries(AUTO)}
        versions_before = len(dataset.versions())
        Merger(store, dataset).add_auto_accepted()
        auto_ids = {i for i in ids if store.get(i).state == AUTO_ACCEPTED}
        db = sqlite3.connect(root / "store" / "dataset" / "dataset.sqlite3")
        have = {r[0] for r in db.execute("SELECT image_id FROM labels WHERE origin='auto'")}
        db.close()
        assert have == auto_ids
        assert old_auto <= auto_ids and len(old_auto) == 6  # what the old release merged stays
        assert dataset.meta("auto_seq") is not None  # the old cursor was swept once
        assert Merger(store, dataset).add_auto_accepted() == 0
        assert len(dataset.versions()) >= versions_before
    finally:
        dataset.close()
        store.close()
