"""The durable store on real SQLite files: life cycle, duplicates, leases, restarts, paging."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from service.errors import ImageNotFound, LeaseLost, StoreFull
from procs import REPO, FakeClock, command_env
from service.store import STATES, Store, image_id_of


def _img(n: int) -> bytes:
    return b"\xff\xd8 fake image %d" % n


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def store(tmp_path: Path, clock: FakeClock):
    s = Store(tmp_path / "store", lease_seconds=10, clock=clock)
    yield s
    s.close()


def test_life_cycle(store: Store, clock: FakeClock) -> None:
    iid, created = store.ingest(_img(1), "drop:/in/a.jpg", {"camera": "cam1"})
    assert created and iid == image_id_of(_img(1))
    assert store.image_bytes(iid) == _img(1)
    row = store.get(iid)
    assert row is not None and row.state == "received" and row.camera == "cam1" and row.source == "drop:/in/a.jpg"
    [claimed] = store.claim("w1")
    assert claimed.image_id == iid and claimed.lease_owner == "w1"
    assert store.claim("w2") == []  # leased
    clock.t += 1
    record = {"width": 640, "height": 480, "heads": [], "persons": []}
    store.complete(iid, "w1", record, "b1", "review", 0.2, ["low_head_conf"], audit=False)
    row = store.get(iid)
    assert row is not None
    assert (row.state, row.decision, row.score, row.reasons, row.width, row.bundle_id) == (
        "review_pending", "review", 0.2, ("low_head_conf",), 640, "b1")
    assert row.record == record and row.lease_owner is None
    assert [h[:2] for h in store.history(iid)] == [
        (None, "received"), ("received", "annotated"), ("annotated", "review_pending")]
    assert store.set_state(iid, ["review_pending"], "uploaded", error=None)
    assert not store.set_state(iid, ["review_pending"], "uploaded")  # already moved
    assert store.set_state(iid, ["uploaded"], "reviewed", record={"width": 640, "height": 480, "fixed": True})
    assert store.get(iid).record["fixed"]  # type: ignore[union-attr]
    counts = store.counts()
    assert set(counts) == set(STATES) and counts["reviewed"] == 1 and sum(counts.values()) == 1


def test_recent_scores_of_one_bundle_by_arrival(store: Store, clock: FakeClock) -> None:
    """What ``judge.review_share`` recalls at start: the bundle's newest judged images, oldest first."""
    ids = []
    for k, (bundle, doubt) in enumerate([("b1", 1.5), ("b2", 0.5), ("b1", None), ("b1", 2.5)]):
        iid, _ = store.ingest(_img(10 + k), "test")
        ids.append(iid)
        clock.t += 1
        [row] = store.claim("w")
        judgement = {"score": 0.1 * k} if doubt is None else {"score": 0.1 * k, "doubt": doubt}
        store.complete(row.image_id, "w", {"width": 1, "height": 1, "judgement": judgement}, bundle, "review",
                       0.1 * k, ["low_score", *(["near_duplicate"] if k == 2 else [])], audit=False)
    clock.t += 1
    assert store.set_state(ids[0], ["review_pending"], "uploaded")  # touched last, arrived first
    low, held = ("low_score",), ("low_score", "near_duplicate")  # the daemon reads the holds back
    assert store.recent_scores("b1", 10) == [(0.0, 1.5, low), (pytest.approx(0.2), None, held),
                                             (pytest.approx(0.3), 2.5, low)]
    assert store.recent_scores("b1", 2) == [(pytest.approx(0.2), None, held), (pytest.approx(0.3), 2.5, low)]
    assert store.recent_scores("other", 5) == []


def test_duplicate_bytes_change_nothing(store: Store, clock: FakeClock) -> None:
    iid, _ = store.ingest(_img(1), "a", {"camera": "c"})
    clock.t += 5
    assert store.ingest(_img(1), "b", {"camera": "other"}) == (iid, False)
    row = store.get(iid)
    assert row is not None and row.source == "a" and row.received_at == 1_000_000.0
    assert store.counts()["received"] == 1


def test_fail_and_auto_accept(store: Store) -> None:
    a, _ = store.ingest(_img(1), "s")
    b, _ = store.ingest(_img(2), "s")
    store.claim("w")
    store.fail(a, "w", "decode: truncated JPEG")
    store.complete(b, "w", {"width": 1, "height": 1}, "b1", "auto_accepted", 0.9, [], audit=False)
    assert store.get(a).state == "failed" and store.get(a).error == "decode: truncated JPEG"  # type: ignore[union-attr]
    assert store.get(b).state == "auto_accepted"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.complete(b, "w", {}, "b1", "maybe", 0.5, [], audit=False)
    with pytest.raises(ImageNotFound):
        store.image_bytes("../../etc/passwd")


def test_fail_counts_in_its_own_transaction(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fail`` and the "failed" counter commit together (as ``claim(fail_exhausted=True)`` does):
    counted apart, a kill between the two commits left the image failed and the counter short."""
    a, _ = store.ingest(_img(1), "s")
    b, _ = store.ingest(_img(2), "s")
    store.claim("w")
    store.fail(a, "w", "decode: truncated JPEG")
    assert store.counter("failed") == 1
    store.fail(a, None, "again")  # already failed: not counted twice
    assert store.counter("failed") == 1

    def dies(*args: object) -> None:
        raise RuntimeError("killed at the count")

    monkeypatch.setattr(Store, "_bump", staticmethod(dies))
    with pytest.raises(RuntimeError, match="killed at the count"):
        store.fail(b, "w", "decode: truncated JPEG")
    monkeypatch.undo()
    row = store.get(b)
    assert row is not None and row.state == "received" and row.lease_owner == "w"  # rolled back with the count
    assert [h[1] for h in store.history(b)] == ["received"] and store.counter("failed") == 1


_KILLED_INGEST = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from service.store import Store
    def killed(src, dst, *args, **kwargs):  # a kill -9 between the temporary copy and its rename
        os._exit(9)
    os.replace = killed
    Store(Path(sys.argv[1])).ingest(sys.argv[2].encode() * 50_000, "test")
""")


def test_open_removes_temp_copies_left_by_killed_ingests(tmp_path: Path) -> None:
    """A kill between an ingest's temporary copy and its rename leaves a hidden full-size copy
    under ``images/<xx>/``; the daemon's next start removes it once it is older than
    ``TEMP_MAX_AGE_SECONDS``. A younger one (a live process sharing the store may be writing it
    right now), other names and the images themselves stay."""
    root = tmp_path / "s"
    s = Store(root)
    kept, _ = s.ingest(_img(1), "s")
    s.close()
    for text in ("old", "new"):
        proc = subprocess.run([sys.executable, "-c", _KILLED_INGEST, str(root), text], cwd=REPO, env=command_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 9, proc.stderr
    temps = {p.name[1:25]: p for p in (root / "images").rglob(".*.tmp")}
    old = temps[image_id_of(b"old" * 50_000)[:24]]
    new = temps[image_id_of(b"new" * 50_000)[:24]]
    assert len(temps) == 2 and old.stat().st_size == 150_000
    long_ago = time.time() - 24 * 3600  # far past TEMP_MAX_AGE_SECONDS
    os.utime(old, (long_ago, long_ago))
    other = old.parent / ".notes.tmp"  # not an ingest's name
    other.write_bytes(b"x")
    os.utime(other, (long_ago, long_ago))
    real = s.image_path(kept)
    os.utime(real, (long_ago, long_ago))
    s = Store(root)  # the restart: the daemon clears them as it starts
    s.remove_stale_temps()
    try:
        assert not old.exists() and new.exists() and other.exists()
        assert s.image_bytes(kept) == _img(1)
        iid, created = s.ingest(b"old" * 50_000, "again")  # the killed ingest, tried again
        assert created and s.image_bytes(iid) == b"old" * 50_000
    finally:
        s.close()


def test_lease_expiry_takeover_and_lease_lost(store: Store, clock: FakeClock) -> None:
    iid, _ = store.ingest(_img(1), "s")
    assert len(store.claim("w1")) == 1
    clock.t += 9.9
    assert store.claim("w2") == []
    clock.t += 0.2  # w1's lease has expired
    [row] = store.claim("w2")
    assert row.lease_owner == "w2" and row.attempts == 2
    with pytest.raises(LeaseLost):
        store.complete(iid, "w1", {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], audit=False)
    with pytest.raises(LeaseLost):
        store.fail(iid, "w1", "late")
    assert store.get(iid).state == "received"  # type: ignore[union-attr]
    store.complete(iid, "w2", {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], audit=False)
    with pytest.raises(LeaseLost):  # a second completion never annotates twice
        store.complete(iid, "w2", {"width": 1, "height": 1}, "b", "review", 0.0, [], audit=False)
    assert store.get(iid).decision == "auto_accepted"  # type: ignore[union-attr]


def test_expired_but_untaken_lease_may_still_complete(store: Store, clock: FakeClock) -> None:
    iid, _ = store.ingest(_img(1), "s")
    store.claim("w1")
    clock.t += 60
    store.complete(iid, "w1", {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], audit=False)
    assert store.get(iid).state == "auto_accepted"  # type: ignore[union-attr]


def test_renew_and_release(store: Store, clock: FakeClock) -> None:
    iid, _ = store.ingest(_img(1), "s")
    store.claim("w1")
    clock.t += 8
    assert store.renew("w1", [iid]) == 1
    clock.t += 8
    assert store.claim("w2") == []
    assert store.release("w1") == 1
    assert [r.image_id for r in store.claim("w2")] == [iid]


def test_crash_loop_gives_up(tmp_path: Path, clock: FakeClock) -> None:
    s = Store(tmp_path / "s", lease_seconds=1, clock=clock, max_attempts=2)
    iid, _ = s.ingest(_img(1), "s")
    for _ in range(2):
        assert len(s.claim("w")) == 1
        clock.t += 2
    assert s.claim("w") == []
    row = s.get(iid)
    assert row is not None and row.state == "failed" and "2 times" in (row.error or "")
    s.close()


def test_restart_resumes_unfinished_work(tmp_path: Path, clock: FakeClock) -> None:
    first = Store(tmp_path / "s", lease_seconds=10, clock=clock)
    ids = [first.ingest(_img(i), "s")[0] for i in range(3)]
    died = {r.image_id for r in first.claim("daemon-1", limit=2)}  # then the process dies without releasing
    first.close()
    clock.t += 11
    second = Store(tmp_path / "s", lease_seconds=10, clock=clock)
    batches = []
    while batch := second.claim("daemon-2", limit=10):
        batches.append([r.image_id for r in batch])
    assert sorted(i for b in batches for i in b) == sorted(ids)
    assert all(len(b) == 1 for b in batches if died & set(b))  # the rows of the dead batch come back one by one
    second.close()


def test_a_row_claimed_before_is_claimed_alone(store: Store, clock: FakeClock) -> None:
    """Only rows never claimed share a batch: a batch re-claimed after its worker died (or lost
    the lease) would bring the image that killed it back with everything else."""
    ids = [store.ingest(_img(i), "s")[0] for i in range(5)]
    clock.t += 1
    late = store.ingest(_img(99), "s")[0]
    assert len(store.claim("w1", limit=5)) == 5
    clock.t += 11  # w1 died with its batch
    for expected in sorted(ids):  # oldest first (one arrival time: by id), one at a time
        [row] = store.claim("w2", limit=8)
        assert (row.image_id, row.attempts) == (expected, 2)
        store.complete(row.image_id, "w2", {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], False)
    assert [r.image_id for r in store.claim("w2", limit=8)] == [late]
    store.complete(late, "w2", {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], False)
    # a batch of fresh rows stops before the first row claimed before; that row leads the next claim
    fresh = []
    for i in range(3):
        clock.t += 1
        fresh.append(store.ingest(_img(100 + i), "s")[0])
    a, b, c = fresh
    store.claim("w3", limit=1)  # a
    store.claim("w4", limit=1)  # b
    store.release("w3")  # a given back at a shutdown: never tried, fresh again
    clock.t += 11
    assert [r.image_id for r in store.claim("w5", limit=8)] == [a]
    assert [r.image_id for r in store.claim("w5", limit=8)] == [b]
    assert [r.image_id for r in store.claim("w5", limit=8)] == [c]


def test_a_poison_image_fails_alone(tmp_path: Path, clock: FakeClock) -> None:
    """One image in a batch kills its worker each time it is processed: it alone ends up failed,
    after ``max_attempts`` claims; the images that shared its batch are annotated."""
    s = Store(tmp_path / "s", lease_seconds=10, clock=clock, max_attempts=5)
    ids = [s.ingest(_img(i), "s")[0] for i in range(8)]
    poison = ids[3]
    for n in range(40):
        batch = s.claim(f"host:{n}/w0", limit=8)
        if not batch and not s.counts()["received"]:
            break
        if not batch or poison in {r.image_id for r in batch}:
            clock.t += 11  # the worker died with its batch: the leases expire
            continue
        for r in batch:
            s.complete(r.image_id, f"host:{n}/w0", {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], False)
    failed = s.get(poison)
    assert failed is not None and failed.state == "failed"
    assert "claimed 5 times without finishing" in (failed.error or "")
    assert s.counts()["auto_accepted"] == 7 and s.counts()["failed"] == 1
    assert s.counter("failed") == 1  # counted in the failing transaction
    s.close()


def test_an_exhausted_row_is_handed_to_the_caller_to_fail(tmp_path: Path, clock: FakeClock) -> None:
    """``fail_exhausted=False`` (the daemon): a row claimed ``max_attempts`` times comes back
    alone and leased, and ``exhausted`` names the reason; the caller fails it through its own
    path (quarantine copy, reason file, waiters, counter)."""
    s = Store(tmp_path / "s", lease_seconds=1, clock=clock, max_attempts=2)
    iid, _ = s.ingest(_img(1), "s")
    clock.t += 0.1
    other, _ = s.ingest(_img(2), "s")
    for _ in range(2):
        [row] = s.claim("w", limit=1)
        assert s.exhausted(row) is None
        clock.t += 2
    [row] = s.claim("w2", limit=8, fail_exhausted=False)
    assert row.image_id == iid and row.lease_owner == "w2" and row.state == "received"
    reason = s.exhausted(row)
    assert reason is not None and "claimed 2 times without finishing" in reason
    s.fail(iid, "w2", reason)
    assert [r.image_id for r in s.claim("w2", limit=8, fail_exhausted=False)] == [other]
    s.close()


def test_two_stores_in_two_threads_never_double_claim(tmp_path: Path) -> None:
    root = tmp_path / "s"
    seed = Store(root)
    for i in range(60):
        seed.ingest(_img(i), "s")
    seed.close()
    got: dict[str, list[str]] = {"a": [], "b": []}

    def work(owner: str) -> None:
        s = Store(root, lease_seconds=300)
        while batch := s.claim(owner, limit=3):
            for row in batch:
                got[owner].append(row.image_id)
                s.complete(row.image_id, owner, {"width": 1, "height": 1}, "b", "auto_accepted", 1.0, [], False)
        s.close()

    threads = [threading.Thread(target=work, args=(o,)) for o in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got["a"]) + len(got["b"]) == 60
    assert len(set(got["a"]) | set(got["b"])) == 60


def test_disk_floor(tmp_path: Path) -> None:
    s = Store(tmp_path / "s", min_free_bytes=1 << 62)
    reason = s.paused_reason()
    assert reason is not None and "below the floor" in reason
    with pytest.raises(StoreFull):
        s.ingest(_img(1), "s")
    assert s.counts()["received"] == 0
    s.close()
    s = Store(tmp_path / "s", min_free_bytes=0)
    assert s.paused_reason() is None
    s.close()


def test_paging_and_filters(store: Store, clock: FakeClock) -> None:
    ids = []
    for i in range(7):
        clock.t += 1
        ids.append(store.ingest(_img(i), "s")[0])
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list(limit=3, after=cursor)
        seen += [r.image_id for r in page]
        pages += 1
        if cursor is None:
            break
    assert seen == ids and pages == 3
    page, cursor = store.list(since=1_000_003.0, until=1_000_005.0)
    assert [r.image_id for r in page] == ids[2:4] and cursor is None
    store.claim("w", limit=1)
    store.complete(ids[0], "w", {"width": 1, "height": 1}, "b", "review", 0.1, [], audit=True)
    assert [r.image_id for r in store.list(state="review_pending")[0]] == [ids[0]]
    assert [r.image_id for r in store.list(decision="review")[0]] == [ids[0]]
    assert store.list(state="reviewed") == ([], None)


def test_counters_persist(tmp_path: Path) -> None:
    s = Store(tmp_path / "s")
    assert s.counter("review:hour") == 0
    assert s.counter("review:hour", 2) == 2
    assert s.take("review:hour", 3) and not s.take("review:hour", 3)
    s.close()
    s = Store(tmp_path / "s")
    assert s.counter("review:hour") == 3
    s.close()


def test_latest_per_camera(store: Store, clock: FakeClock) -> None:
    """The newest images of each camera with a decision, oldest first (the near-duplicate memory's recall)."""
    want: dict[str, list[str]] = {}
    for n, (camera, decision) in enumerate([("c1", "review"), ("c2", "review"), ("c1", "auto_accepted"),
                                            ("c1", "review"), ("c1", "review"), (None, "review"), ("c2", "review")]):
        clock.t += 1
        meta = {"camera": camera} if camera else {}
        iid, _ = store.ingest(_img(100 + n), "t", meta)
        [row] = store.claim("w")
        store.complete(row.image_id, "w", {"width": 1, "height": 1}, "b", decision, 0.1, [], audit=False)
        if decision == "review":
            want.setdefault(camera or "", []).append(iid)
    got = store.latest_per_camera("review", 2)
    assert [r.image_id for r in got if r.camera == "c1"] == want["c1"][-2:]
    assert [r.image_id for r in got if r.camera == "c2"] == want["c2"]
    assert [r.image_id for r in got if not r.camera] == want[""]
    assert [r.received_at for r in got] == sorted(r.received_at for r in got) and len(got) == 5
    assert store.latest_per_camera("review", 0) == [] and store.latest_per_camera("failed", 5) == []


def test_a_store_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    """A store held by another program is not "run as another user"; a read-only one is."""
    import sqlite3

    from service.sqlite import open_failure

    locked = open_failure("store", tmp_path, sqlite3.OperationalError("database is locked"))
    assert "another program holds it" in locked and "sudo" not in locked
    readonly = open_failure("store", tmp_path, sqlite3.OperationalError("attempt to write a readonly database"))
    assert "sudo -u annotator" in readonly and str(tmp_path) in readonly
