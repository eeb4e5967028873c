"""A store after a year on a busy lab box: what a user or the daemon does per image or per pass
reads about as much of a store of 16,000 images as of one of 2,000 (``service.store_scale``
builds them; ``python -m service.store_scale 200000`` times them). Work is counted in SQLite
virtual-machine steps (a progress handler), not in seconds: the same on any machine."""
from __future__ import annotations

import itertools
import json
import random
import sqlite3
from concurrent import futures
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc
from service.server import AnnotatorServicer
from service.store import AUTO_ACCEPTED, REVIEW_PENDING, REVIEWED, UPLOADED, Completion, Store, image_id_of
from service.store_scale import CAMERAS, DAY, _record, build

NOW = 1_750_000_000.0
SMALL, BIG = 2_000, 16_000
GROWTH = 1.5  # most a per-image operation may cost more on the big store (the rows are 8 times as many)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("scale")
    made = {n: build(root / str(n), n, now=NOW, fast=True, persons=(1, 1)) for n in (SMALL, BIG)}
    yield made
    for s in made.values():
        s.close()


def steps(store: Store, fn: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in tens) that ``fn`` runs on this thread's connection."""
    db = store._conn()
    n = [0]

    def tick() -> int:
        n[0] += 1
        return 0

    db.set_progress_handler(tick, 10)
    try:
        fn()
    finally:
        db.set_progress_handler(None, 10)
    return n[0]


def growth(stores: dict[int, Store], op: Callable[[Store], object]) -> float:
    """Steps of ``op`` on the big store over those on the small one; per row returned plus one
    for an op that returns a list (the small store may hold fewer of what it asks for)."""
    cost = []
    for n in (SMALL, BIG):
        out: list = []
        cost.append(steps(stores[n], lambda n=n: out.append(op(stores[n]))))
        if isinstance(out[0], list):
            cost[-1] /= len(out[0]) + 1
    return cost[1] / max(cost[0], 1)


def _late_cursor(store: Store, **filters: Any) -> str:
    row = store.list(since=NOW - 5 * DAY, limit=1, **filters)[0][0]
    return f"{row.received_at!r}|{row.image_id}"  # Store.list's cursor


@pytest.mark.parametrize("filters", [{}, {"state": AUTO_ACCEPTED}, {"decision": "auto_accepted"}])
def test_a_page_seeks_to_its_cursor(stores: dict[int, Store], filters: dict) -> None:
    """Paging (ListAnnotations, export, the sync agent's sweeps) read every row before the
    cursor: the cursor test was spelt with an OR, which SQLite does not seek by. A page near the
    end of a year cost 8 times as much on 8 times the rows; an export read n^2/page rows."""
    def page(store: Store) -> None:
        rows, cursor = store.list(limit=10, after=_late_cursor(store, **filters), **filters)
        assert len(rows) == 10 and cursor is not None

    assert growth(stores, page) < GROWTH
    # the same rows as the cursor test spelt out
    store = stores[SMALL]
    after = _late_cursor(store, **filters)
    at, _, last = after.partition("|")
    got = [r.image_id for r in store.list(limit=50, after=after, **filters)[0]]
    where = "".join(f" AND {k} = '{v}'" for k, v in filters.items())
    want = [r[0] for r in store._conn().execute(
        f"SELECT image_id FROM images WHERE (received_at > ? OR (received_at = ? AND image_id > ?)){where} "
        "ORDER BY received_at, image_id LIMIT 50", (float(at), float(at), last))]
    assert got == want


def test_start_up_and_reload_reads_do_not_grow(stores: dict[int, Store]) -> None:
    """At each start and each reload the daemon refills the review share of its bundle (a new
    bundle has no rows: every image was read to find none) and the near-duplicate memory from
    the newest review frames of each camera (every review was read and sorted)."""
    assert growth(stores, lambda s: s.recent_scores("a-bundle-never-used", 100)) < GROWTH
    assert growth(stores, lambda s: s.recent_scores(s.newest(1)[0].bundle_id or "", 20)) < GROWTH
    assert growth(stores, lambda s: s.latest_per_camera("review", 8)) < GROWTH


def test_latest_per_camera_and_newest_of_a_camera_are_what_they_were(stores: dict[int, Store]) -> None:
    store = stores[SMALL]
    for i in range(3):  # images without a camera form their own group
        store.ingest(f"no camera {i}".encode(), "grpc:test", {})
    db = store._conn()
    for decision in ("review", "auto_accepted"):
        want = [r[0] for r in db.execute(
            "SELECT image_id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY camera ORDER BY received_at DESC, "
            "image_id DESC) AS newest FROM images WHERE decision = ?) WHERE newest <= ? "
            "ORDER BY received_at, image_id", (decision, 5))]
        assert [r.image_id for r in store.latest_per_camera(decision, 5)] == want
    for camera in (*CAMERAS, "no-such-camera"):
        for state in (None, REVIEWED, "received"):
            where = "record IS NOT NULL" if state is None else f"state = '{state}'"
            want = [r[0] for r in db.execute(f"SELECT image_id FROM images WHERE {where} AND camera = ? "
                                             "ORDER BY received_at DESC, image_id DESC LIMIT 7", (camera,))]
            assert [r.image_id for r in store.newest(7, state=state, camera=camera)] == want


def test_show_of_a_camera_does_not_read_the_store(stores: dict[int, Store]) -> None:
    """``annotator show --camera`` walked every image newest first for one with few or none."""
    for s in stores.values():  # a camera with three images early in the year, annotated
        for i in range(3):
            image_id = s.ingest(f"rare {i}".encode(), "drop:rare/s/a.jpg", {"camera": "rare"})[0]
            with s.transaction() as db:
                db.execute("UPDATE images SET received_at = ?, state = 'auto_accepted', decision = 'auto_accepted', "
                           "record = '{}' WHERE image_id = ?", (NOW - 300 * DAY + i, image_id))
    assert growth(stores, lambda s: s.newest(20, camera="no-such-camera")) < GROWTH
    assert growth(stores, lambda s: s.newest(20, camera="rare")) < GROWTH
    assert [len(s.newest(20, camera="rare")) for s in stores.values()] == [3, 3]


def test_counts_are_kept_not_counted(stores: dict[int, Store]) -> None:
    """``counts`` (every Prometheus scrape, ``annotator status``) read the whole state index."""
    assert growth(stores, lambda s: s.counts()) < GROWTH
    for s in stores.values():
        got = s.counts()
        want = dict(s._conn().execute("SELECT state, count(*) FROM images GROUP BY state").fetchall())
        assert {k: v for k, v in got.items() if v} == want


def test_per_image_work_does_not_grow(stores: dict[int, Store]) -> None:
    """Ingest, claim, complete (with its budget counters) of one image, as the daemon does them."""
    fresh = itertools.count()

    def one(store: Store) -> None:
        image_id, created = store.ingest(f"fresh {next(fresh)}".encode(), "drop:cabin-front/s/a.jpg",
                                         {"camera": "cabin-front", "path": "cabin-front/s/a.jpg"})
        assert created
        rows = store.claim("w0", 8)
        assert [r.image_id for r in rows] == [image_id]
        store.complete_many("w0", [Completion(image_id, {"width": 1, "height": 1}, "b", "review", 0.1, ("low_score",),
                                              False, ("review:hour:2025061500",))])

    for s in stores.values():  # the received ones the other tests left
        while rows := s.claim("drain", 50):
            s.complete_many("drain", [Completion(r.image_id, {}, "b", "auto_accepted", 0.9) for r in rows])
    assert growth(stores, one) < GROWTH


def _old_schema(path: Path) -> None:
    """The store as the code before this audit left it: no new indexes, no state_counts."""
    db = sqlite3.connect(path)
    db.executescript("DROP INDEX IF EXISTS images_by_bundle; DROP INDEX IF EXISTS images_by_camera; "
                     "DROP TRIGGER IF EXISTS state_counts_insert; DROP TRIGGER IF EXISTS state_counts_delete; "
                     "DROP TRIGGER IF EXISTS state_counts_update; DROP TABLE IF EXISTS state_counts;")
    db.close()


def test_an_existing_store_gets_the_indexes_and_its_counts(tmp_path: Path) -> None:
    clock = [NOW]
    store = Store(tmp_path, clock=lambda: clock[0])
    ids = [store.ingest(f"image {i}".encode(), "grpc:test", {"camera": "cab"})[0] for i in range(6)]
    store.close()
    _old_schema(tmp_path / "store.sqlite3")
    store = Store(tmp_path, clock=lambda: clock[0])
    names = {r[0] for r in store._conn().execute("SELECT name FROM sqlite_master")}
    assert {"images_by_bundle", "images_by_camera", "state_counts"} <= names
    assert store.counts()["received"] == 6
    # every way a row moves keeps the counts right
    claimed = store.claim("w0", 8)
    assert len(claimed) == 6
    store.complete_many("w0", [Completion(ids[0], {}, "b", "auto_accepted", 0.9),
                               Completion(ids[1], {}, "b", "review", 0.1, ("low_score",)),
                               Completion(ids[2], {}, "b", "review", 0.1, ("low_score",))])
    store.fail(ids[3], "w0", "bad")
    store.release("w0")
    store.set_state(ids[1], [REVIEW_PENDING], UPLOADED)
    store.set_state(ids[1], [UPLOADED], UPLOADED)  # a move to the same state counts nothing
    store.fail(ids[3], None, "again")
    clock[0] += 40 * DAY
    assert store.prune_auto_images(clock[0] - 30 * DAY)[0] == [ids[0]]
    want = dict(store._conn().execute("SELECT state, count(*) FROM images GROUP BY state").fetchall())
    assert {k: v for k, v in store.counts().items() if v} == want == \
        {"received": 2, "auto_accepted": 1, "review_pending": 1, "uploaded": 1, "failed": 1}
    with store.transaction() as db:
        db.execute("DELETE FROM images WHERE image_id = ?", (ids[4],))
    assert store.counts()["received"] == 1
    store.close()


class _Daemon:
    def __init__(self, store: Store) -> None:
        self.store = store


def test_a_page_of_crowded_annotations_fits_a_default_client(tmp_path: Path) -> None:
    """1,000 annotations of 10 persons are 7 MiB: a page by count alone was refused by a client
    with gRPC's default 4 MiB receive limit (RESOURCE_EXHAUSTED), however it paged."""
    store = Store(tmp_path, clock=lambda: NOW)
    rng = random.Random(1)
    rows = []
    for i in range(200):  # 200 x 40 persons: about 5.7 MiB of annotations
        image_id = image_id_of(f"crowd {i}".encode())
        record = _record(rng, image_id, "grpc:test", "b", "review", 0.1, ["low_score"], False, NOW, 40)
        rows.append((image_id, REVIEW_PENDING, "grpc:test", NOW + i, NOW + i, json.dumps(record)))
    with store.transaction() as db:
        db.executemany("INSERT INTO images (image_id, state, source, received_at, updated_at, record, decision, "
                       "score, reasons, bundle_id, width, height) "
                       "VALUES (?,?,?,?,?,?,'review',0.1,'[\"low_score\"]','b',1280,720)", rows)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AnnotatorServicer_to_server(AnnotatorServicer(_Daemon(store)), server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # default options: 4 MiB
            stub = pb_grpc.AnnotatorStub(channel)
            got, token, pages, total = [], "", 0, 0
            while True:
                page = stub.ListAnnotations(pb.ListAnnotationsRequest(page_size=1000, page_token=token), timeout=30)
                assert page.ByteSize() < 4 * 1024 * 1024 and len(page.annotations) >= 1
                got += [a.image_id for a in page.annotations]
                total += page.ByteSize()
                pages += 1
                token = page.next_page_token
                if not token:
                    break
    finally:
        server.stop(None)
        store.close()
    assert got == [r[0] for r in rows] and total > 4 * 1024 * 1024 and pages == 2
