"""The uploader: exactly once through crashes and outages, privacy, de-duplication, downscale,
and an end with a reason for an image that can never be uploaded."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from service.store import FAILED, REVIEW_PENDING, Store
from sync.backoff import RetryPolicy, compute_backoff
from sync.errors import PermanentError, RetryableError
from sync.journal import Journal
from sync.objectstore import LocalFolderStore, ObjectInfo, ObjectStore, S3Store
from sync.uploader import JOURNAL_NAME, Uploader, UploadSettings

from reviewdata import fill_store
from s3servers import S3Server

FAST = RetryPolicy(base=0.02, cap=0.3, attempts=None, rng=random.Random(7))


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, nothing catches it."""


class Recording:
    """An ObjectStore wrapper that counts successful puts per key; runs ``hook(n)`` before put
    number n and ``after(n)`` once it succeeded."""

    def __init__(self, inner: ObjectStore, hook: Callable[[int], None] | None = None,
                 after: Callable[[int], None] | None = None) -> None:
        self.inner, self.hook, self.after, self.puts, self.calls = inner, hook, after, Counter(), 0

    def put(self, key: str, data, content_type: str = "application/octet-stream", sha256=None, metadata=None) -> None:
        self.calls += 1
        if self.hook:
            self.hook(self.calls)
        self.inner.put(key, data, content_type, sha256, metadata)
        self.puts[key] += 1
        if self.after:
            self.after(self.calls)

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def get(self, key: str, progress=None) -> bytes:
        return self.inner.get(key, progress)

    def list(self, prefix: str = ""):
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def check(self) -> None:
        self.inner.check()

    def uri(self, key: str) -> str:
        return self.inner.uri(key)


def drain(uploader: Uploader) -> None:
    for _ in range(100):
        if not uploader.run_once():
            return
    raise AssertionError("the uploader never ran out of work")


def manifest_lines(target: ObjectStore) -> list[dict]:
    return [json.loads(t) for k in target.list("manifests/") for t in target.get(k).decode().splitlines()]


def assert_exactly_once(target: ObjectStore, store: Store, review_ids: list[str], appliance: str = "box-1") -> None:
    lines = manifest_lines(target)
    assert sorted(line["image-id"] for line in lines) == sorted(review_ids)  # each once, nothing else
    assert len(list(target.list("images/"))) == len(review_ids)
    assert len(list(target.list(f"preannotations/{appliance}/"))) == len(review_ids)
    for line in lines:
        key = line["source-ref"].split("/edge/", 1)[1]
        assert target.head(key).sha256 == key.split("/")[1].split(".")[0]
    assert all(store.get(i).state == "uploaded" for i in review_ids)


@pytest.mark.parametrize("attempt, base, cap, ceiling", [(0, 0.5, 60, 0.5), (3, 0.5, 60, 4.0), (40, 0.5, 60, 60.0),
                                                         (2, 0.0, 60, 0.0)])
def test_compute_backoff_full_jitter(attempt: int, base: float, cap: float, ceiling: float) -> None:
    rng = random.Random(1)
    values = [compute_backoff(attempt, base, cap, rng) for _ in range(200)]
    assert all(0 <= v <= ceiling for v in values)
    assert ceiling == 0 or max(values) > 0.8 * ceiling  # spread over the whole range


@pytest.fixture(params=["local", "moto"])
def target(request: pytest.FixtureRequest, tmp_path: Path, s3_env: None) -> ObjectStore:
    if request.param == "local":
        return LocalFolderStore(tmp_path / "bucket", "edge")
    server: S3Server = request.getfixturevalue("moto_server")
    return S3Store(server.new_bucket(), "edge", endpoint_url=server.endpoint_url, region="us-east-1")


def test_only_review_pending_images_go_up_exactly_once(target: ObjectStore, tmp_path: Path) -> None:
    store, review, auto = fill_store(tmp_path / "store", review=5, auto=2)
    rec = Recording(target)
    drain(Uploader(store, rec, UploadSettings("box-1", batch_size=2, retry=FAST)))
    assert_exactly_once(target, store, review)
    assert max(rec.puts.values()) == 1 and len(rec.puts) == 5 + 5 + 3  # images, pre-annotations, 3 manifests
    assert all(store.get(i).state == "auto_accepted" for i in auto)
    line = manifest_lines(target)[0]
    assert {"source-ref", "image-id", "edge-bundle", "edge-score", "edge-reasons", "edge-audit", "auto-head",
            "auto-kpts"} <= set(line)
    assert store.get(line["image-id"]).meta["upload"]["batch"]
    # A second run finds nothing to do and sends nothing.
    assert not Uploader(store, rec, UploadSettings("box-1", batch_size=2, retry=FAST)).run_once()
    assert max(rec.puts.values()) == 1


@pytest.mark.parametrize("crash_at", [1, 2, 5, 7])  # after put n: image, pre-annotation, next image, manifest (7)
def test_crash_after_a_put_is_repaired_without_sending_again(tmp_path: Path, crash_at: int) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=3)
    target = LocalFolderStore(tmp_path / "bucket", "edge")

    def crash_after(n: int) -> None:
        if n == crash_at:
            raise Crash()

    first = Recording(target, after=crash_after)
    with pytest.raises(Crash):
        drain(Uploader(store, first, UploadSettings("box-1", batch_size=3, retry=FAST)))
    assert all(store.get(i).state == "review_pending" for i in review)  # nothing marked before its manifest
    second = Recording(target)
    drain(Uploader(Store(tmp_path / "store"), second, UploadSettings("box-1", batch_size=3, retry=FAST)))
    assert not set(first.puts) & set(second.puts)  # what arrived before the crash was not sent again
    assert_exactly_once(target, store, review)


def test_appliances_share_a_bucket_and_images_are_deduplicated(tmp_path: Path) -> None:
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    store_a, ids_a, _ = fill_store(tmp_path / "a", review=3)
    store_b, ids_b, _ = fill_store(tmp_path / "b", review=4)  # the same three images and one more
    drain(Uploader(store_a, target, UploadSettings("box-a", retry=FAST)))
    rec = Recording(target)
    drain(Uploader(store_b, rec, UploadSettings("box-b", retry=FAST)))
    assert len(list(target.list("images/"))) == 4
    assert sum(k.startswith("images/") for k in rec.puts) == 1  # only the new image went up
    assert len(list(target.list("preannotations/box-a/"))) == 3 and len(list(target.list("preannotations/box-b/"))) == 4
    assert [k.split("/")[1] for k in target.list("manifests/")] == ["box-a", "box-b"]
    assert all(line["edge-appliance"] in ("box-a", "box-b") for line in manifest_lines(target))


def test_downscale_rescales_boxes_and_points_per_axis(tmp_path: Path) -> None:
    store, (image_id,), _ = fill_store(tmp_path / "store", review=1, width=203, height=151)
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    drain(Uploader(store, target, UploadSettings("box-1", max_side=64, jpeg_quality=80, retry=FAST)))
    (key,) = target.list("images/")
    pixels = cv2.imdecode(np.frombuffer(target.get(key), np.uint8), cv2.IMREAD_COLOR)
    assert pixels.shape[:2] == (48, 64)  # 151 * 64 / 203 = 47.6 -> 48
    sx, sy = 64 / 203, 48 / 151
    pre = json.loads(target.get(f"preannotations/box-1/{hashlib.sha256(target.get(key)).hexdigest()}.json"))
    original = store.get(image_id).record
    assert pre["record"]["heads"][0]["box"] == pytest.approx(
        [v * s for v, s in zip(original["heads"][0]["box"], (sx, sy, sx, sy))])
    for got, was in zip(pre["record"]["persons"][0]["keypoints"], original["persons"][0]["keypoints"]):
        assert (got["x"], got["y"]) == pytest.approx((was["x"] * sx, was["y"] * sy))
    (line,) = manifest_lines(target)
    assert line["auto-head"]["image_size"] == [{"width": 64, "height": 48, "depth": 3}]


def test_an_image_that_leaves_review_pending_is_not_uploaded(tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=3)
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    rec = Recording(target, lambda n: n == 1 and store.set_state(review[2], ["review_pending"], "failed", error="x"))
    drain(Uploader(store, rec, UploadSettings("box-1", retry=FAST)))
    assert sorted(line["image-id"] for line in manifest_lines(target)) == sorted(review[:2])
    assert store.get(review[2]).state == "failed" and len(list(target.list("images/"))) == 2


def test_s3_server_stops_mid_batch_and_comes_back(moto_server, tmp_path: Path, s3_env: None) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=6)
    target = S3Store(moto_server.new_bucket(), "edge", endpoint_url=moto_server.endpoint_url, region="us-east-1",
                     connect_timeout=1, read_timeout=5)
    restarted = threading.Event()

    def outage(n: int) -> None:
        if n == 4:  # in the middle of the first batch: down for a second
            moto_server.stop()
            threading.Timer(1.0, lambda: (moto_server.start(), restarted.set())).start()

    rec = Recording(target, outage)
    drain(Uploader(store, rec, UploadSettings("box-1", batch_size=4, retry=FAST)))
    assert restarted.is_set()
    assert_exactly_once(target, store, review)
    assert max(rec.puts.values()) == 1


def test_wrong_credentials_stop_with_a_clear_error(seaweed: S3Server, tmp_path: Path, s3_env: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=2)
    bucket = seaweed.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    target = S3Store(bucket, "edge", endpoint_url=seaweed.endpoint_url, region="us-east-1")
    with pytest.raises(PermanentError, match="credentials rejected"):
        Uploader(store, target, UploadSettings("box-1", retry=FAST)).run_once()
    assert store.counts()["review_pending"] == 2 and store.counts()["uploaded"] == 0
    assert seaweed.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_missing_bucket_stops_with_a_clear_error(moto_server, tmp_path: Path, s3_env: None) -> None:
    store, _, _ = fill_store(tmp_path / "store", review=2)
    target = S3Store("edge-missing-bucket", "edge", endpoint_url=moto_server.endpoint_url, region="us-east-1")
    with pytest.raises(PermanentError, match="bucket edge-missing-bucket does not exist"):
        Uploader(store, target, UploadSettings("box-1", retry=FAST)).run_once()
    assert store.counts()["uploaded"] == 0


def test_each_object_reports_progress_and_a_slow_batch_keeps_the_watchdog_fed(tmp_path: Path) -> None:
    """A batch on a slow uplink outlasted the watchdog's 900 s: the heartbeat moved only between
    tasks, so systemd killed a healthy agent mid-batch (and the next start began the batch again)."""
    from sync.agent import Agent

    store, review, _ = fill_store(tmp_path / "store", review=3)
    now = [1000.0]
    health: list[bool] = []

    def slow(n: int) -> None:  # each put takes 10 minutes
        now[0] += 600
        health.append(agent.healthy())

    stop = threading.Event()
    agent = Agent([], poll_interval=10, stop=stop, clock=lambda: now[0], stall_limit=900)
    uploader = Uploader(store, Recording(LocalFolderStore(tmp_path / "bucket", "edge"), slow),
                        UploadSettings("box-1", retry=FAST), stop=stop, progress=agent.beat)
    agent.tasks = [uploader]
    assert agent.run_pass()
    assert store.counts()["uploaded"] == 3 and len(health) == 3 + 3 + 1  # images, pre-annotations, manifest
    assert all(health)
    uploader.close()
    # one put that takes longer than the limit alone: unhealthy, as it must be
    stalled = Agent([], poll_interval=10, clock=lambda: now[0], stall_limit=900)
    now[0] += 901
    assert not stalled.healthy()


def test_progress_is_called_once_per_object(tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=2)
    beats: list[int] = []
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    drain(Uploader(store, target, UploadSettings("box-1", retry=FAST), progress=lambda: beats.append(1)))
    assert len(beats) == 2 + 2 + 1  # images, pre-annotations, manifest


# -- images that can never be uploaded ----------------------------------------------------------
# Each spoils one stored image and returns the max_side that makes the uploader decode it, and
# words its failure reason must hold. Only the bytes on disk (or the record) change, as bit rot,
# a deleted file or an oversized record would change them.
def _writable(store: Store, image_id: str) -> Path:
    path = store.image_path(image_id)
    path.chmod(0o644)
    return path


def _garbage(store: Store, image_id: str) -> tuple[int | None, str]:
    _writable(store, image_id).write_bytes(b"no image any more " * 16)
    return None, "damaged"


def _truncated(store: Store, image_id: str) -> tuple[int | None, str]:
    path = _writable(store, image_id)
    path.write_bytes(path.read_bytes()[:300])  # HEAD: uploaded as it is, a grey lower half for the reviewer
    return None, "damaged"


def _too_many_pixels(store: Store, image_id: str) -> tuple[int | None, str]:
    ok, png = cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))
    assert ok
    data = bytearray(png.tobytes())
    data[16:24] = (10_000).to_bytes(4, "big") * 2  # IHDR: 10000 x 10000, over the decoder's limit
    _writable(store, image_id).write_bytes(bytes(data))
    return 32, "damaged"


def _missing(store: Store, image_id: str) -> tuple[int | None, str]:
    _writable(store, image_id).unlink()
    return None, "missing"


def _manifest_too_long(store: Store, image_id: str) -> tuple[int | None, str]:
    record = dict(store.get(image_id).record)
    record["heads"] = [{"box": [1.0 + i % 40, 2.0, 20.0, 30.0], "conf": 0.5} for i in range(3000)]
    assert store.set_state(image_id, ["review_pending"], "review_pending", record=record)
    return None, "manifest line"


@pytest.mark.parametrize("spoil", [_garbage, _truncated, _too_many_pixels, _missing, _manifest_too_long])
def test_an_image_that_can_never_be_uploaded_fails_with_its_reason(
        tmp_path: Path, spoil: Callable[[Store, str], tuple[int | None, str]],
        caplog: pytest.LogCaptureFixture) -> None:
    """It stayed review_pending for ever: never reviewed, never said so, and paged over again by
    every later pass (the journal had only marked it dropped)."""
    store, review, _ = fill_store(tmp_path / "store", review=3)
    bad = review[1]
    max_side, words = spoil(store, bad)
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    rec = Recording(target)
    settings = UploadSettings("box-1", batch_size=2, max_side=max_side, retry=FAST)
    with caplog.at_level(logging.INFO, logger="sync.uploader"):
        drain(Uploader(store, rec, settings))
    row = store.get(bad)
    assert row.state == "failed" and row.error.startswith("not uploaded for review") and words in row.error
    assert row.record is not None  # the annotation stays, for whoever looks at the image
    assert store.history(bad)[-1][0:2] == ("review_pending", "failed") and store.history(bad)[-1][3] == row.error
    assert store.counts()["failed"] == 1 and store.counts()["review_pending"] == 0
    assert_exactly_once(target, store, [review[0], review[2]])  # nothing of it went up, the others once
    assert any(r.levelno == logging.ERROR and bad[:12] in r.getMessage() and "never be reviewed" in r.getMessage()
               for r in caplog.records)
    # Later passes have nothing left to look at, try nothing again and send nothing.
    transitions, puts = len(store.history(bad)), sum(rec.puts.values())
    again = Uploader(Store(tmp_path / "store"), rec, settings)
    assert not again.run_once() and not again.run_once()
    assert len(store.history(bad)) == transitions and sum(rec.puts.values()) == puts


def test_read_errors_and_outages_are_retried_while_a_corrupt_image_fails(tmp_path: Path) -> None:
    """Only what says so about the image itself fails it: a file that cannot be read right now
    (here a directory where it should be: EISDIR) and a target that is down leave the image
    review_pending, its batch open, and the next run uploads it."""
    store, review, _ = fill_store(tmp_path / "store", review=3)
    corrupt, unreadable = review[0], review[1]
    _garbage(store, corrupt)
    path = _writable(store, unreadable)
    saved = path.read_bytes()
    path.unlink()
    path.mkdir()
    down = [True]

    def outage(n: int) -> None:
        if down[0]:
            raise RetryableError("connection refused (S3 is down)")

    rec = Recording(LocalFolderStore(tmp_path / "bucket", "edge"), outage)
    settings = UploadSettings("box-1", retry=RetryPolicy(base=0.01, cap=0.02, attempts=2, rng=random.Random(7)))
    with pytest.raises(IsADirectoryError):
        Uploader(store, rec, settings).run_once()
    assert store.get(unreadable).state == "review_pending" and store.get(unreadable).error is None
    path.rmdir()
    path.write_bytes(saved)
    with pytest.raises(RetryableError):  # the uploader gives up for now; the agent tries again later
        Uploader(store, rec, settings).run_once()
    assert all(store.get(i).state == "review_pending" and store.get(i).error is None for i in review[1:])
    down[0] = False
    drain(Uploader(store, rec, settings))
    assert_exactly_once(rec.inner, store, review[1:])
    assert store.get(corrupt).state == "failed" and "damaged" in store.get(corrupt).error


class DropCrashes(Journal):
    """A journal whose process dies when it is about to mark an item dropped."""

    def item_state(self, image_id: str, state: str, note: str | None = None) -> None:
        if state == "dropped":
            raise Crash()
        super().item_state(image_id, state, note)


def test_a_kill_between_failing_the_image_and_dropping_its_item(tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=3)
    bad = review[1]
    _garbage(store, bad)
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    settings = UploadSettings("box-1", retry=FAST)
    journal = DropCrashes(tmp_path / "store" / JOURNAL_NAME, time.time)
    with pytest.raises(Crash):
        drain(Uploader(store, target, settings, journal=journal))
    journal.close()
    assert store.get(bad).state == "failed"  # written first: the reason is there whatever comes next
    assert all(store.get(i).state == "review_pending" for i in (review[0], review[2]))
    after = Uploader(Store(tmp_path / "store"), target, settings)
    drain(after)
    assert_exactly_once(target, store, [review[0], review[2]])
    assert [t[1] for t in store.history(bad)].count("failed") == 1
    (batch,) = after.journal.batches()
    assert {i.image_id: i.state for i in after.journal.items(batch.batch_id)}[bad] == "dropped"


def test_images_an_earlier_version_dropped_and_left_review_pending_are_taken_up_again(tmp_path: Path) -> None:
    """A store and journal as the earlier uploader left them: items dropped ("cannot prepare")
    while their images stayed review_pending. One file is readable again (restored by hand),
    one is still corrupt: the first goes up once, the second fails with its reason."""
    store, review, _ = fill_store(tmp_path / "store", review=3)
    restored, corrupt = review[0], review[1]
    _garbage(store, corrupt)
    journal = Journal(tmp_path / "store" / JOURNAL_NAME, time.time)
    old = journal.create_batch([restored, corrupt], lambda seq: f"20250101T000000Z-{seq:06d}")
    for image_id in (restored, corrupt):
        journal.item_state(image_id, "dropped", f"cannot prepare: no image {image_id} in {store.root}")
    journal.set_batch_state(old.batch_id, "done")
    target = LocalFolderStore(tmp_path / "bucket", "edge")
    drain(Uploader(store, target, UploadSettings("box-1", retry=FAST), journal=journal))
    assert_exactly_once(target, store, [restored, review[2]])
    assert store.get(corrupt).state == "failed" and "damaged" in store.get(corrupt).error
    assert journal.items(old.batch_id) == []  # both moved to the batch that took them up
    assert store.counts()["review_pending"] == 0


def test_a_jpeg_quality_out_of_range_is_refused_before_any_image_is_failed_for_it() -> None:
    """prepare_upload's ValueError fails an image for good: a bad setting must be refused first."""
    for quality in (0, 101):
        with pytest.raises(ValueError, match="jpeg_quality"):
            UploadSettings("box-1", jpeg_quality=quality)


def test_an_image_failed_for_good_counts_in_the_failed_counter(tmp_path: Path) -> None:
    """``set_state`` into ``failed`` counts like ``Store.fail``: the daemon's lifetime counter
    (``annotator status``) includes images the uploader gave up on."""
    store = Store(tmp_path / "store")
    try:
        image_id, _ = store.ingest(b"\xff\xd8 counted", "test")
        store.claim("w")
        store.complete(image_id, "w", {"width": 8, "height": 8, "heads": [], "persons": []}, "b", "review", 0.1, [],
                       audit=False)
        assert store.set_state(image_id, [REVIEW_PENDING], FAILED, error="not uploaded for review: test")
        assert not store.set_state(image_id, [REVIEW_PENDING], FAILED, error="again")
        assert store.counter("failed") == 1
    finally:
        store.close()


def test_two_boxes_under_one_appliance_id_are_told_to_name_themselves(tmp_path: Path) -> None:
    """Two boxes left with one appliance id (a cloned config) on one bucket: the second's first
    batch in the same second has the first's manifest name, and the refusal named only the key
    and two checksums. It names the setting that was left shared."""
    from sync.errors import ConflictError

    target = LocalFolderStore(tmp_path / "bucket", "edge")
    store_a, _, _ = fill_store(tmp_path / "a", review=2)
    store_b, _, _ = fill_store(tmp_path / "b", review=3)
    clock = lambda: 1_800_000_000.0  # noqa: E731  both in one second
    drain(Uploader(store_a, target, UploadSettings("box-1", retry=FAST), clock=clock))
    with pytest.raises(ConflictError, match=r"another box writing under the appliance id 'box-1'.*appliance_id"):
        drain(Uploader(store_b, target, UploadSettings("box-1", retry=FAST), clock=clock))
