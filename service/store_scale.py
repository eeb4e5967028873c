"""A store after a year on a busy lab box, built fast, and what each operation costs on it.

``build(root, n)`` writes ``n`` image rows into a real ``Store`` (its own schema, then
``executemany``), shaped as the daemon leaves them after a year: drop-folder images of a few
cameras in recordings (``<camera>/<session>/frame_NNNNNN.jpg``), annotated by a bundle per
month, about 93 % auto-accepted (those older than 30 days pruned by retention), 5 % reviewed
and a few uploaded, pending, failed and received; each with the transitions and counters the
daemon and the sync agent log. Image bytes are not written (rows only; the newest ``files``
images get a small file).

``python -m service.store_scale [N ...]`` builds stores of 10,000 and N rows (default 200,000)
under a temporary folder and prints the time of each operation on both, and the ratio. Used
for the scale audit (``tests/service/test_store_scale.py`` checks the query plans).
"""
from __future__ import annotations

import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .store import (AUTO_ACCEPTED, FAILED, PRUNED_NOTE, RECEIVED, REVIEW_PENDING, REVIEWED, UPLOADED, Store,
                    image_file)

DAY = 86400.0
CAMERAS = ("cabin-front", "cabin-rear", "cabin-left", "cabin-right")
KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle", "mouth", "neck")


def _record(rng: random.Random, image_id: str, source: str, bundle: str, decision: str, score: float,
            reasons: list[str], audit: bool, at: float, persons: int) -> dict:
    def point() -> dict:
        vis = rng.choice(("visible", "visible", "occluded", "outside"))
        return {"x": round(rng.uniform(0, 1280), 2), "y": round(rng.uniform(0, 720), 2),
                "main_conf": round(rng.random(), 4), "visible_conf": round(rng.random(), 4), "visibility": vis}

    def box() -> list[float]:
        x, y = rng.uniform(0, 900), rng.uniform(0, 400)
        return [round(x, 2), round(y, 2), round(x + rng.uniform(50, 380), 2), round(y + rng.uniform(50, 320), 2)]

    return {"image_id": image_id, "source": source, "width": 1280, "height": 720,
            "heads": [{"box": box(), "conf": round(rng.random(), 4)} for _ in range(persons)],
            "persons": [{"box": box(), "conf": round(rng.random(), 4), "visible_match_conf": round(rng.random(), 4),
                         "keypoints": [point() for _ in KEYPOINTS]} for _ in range(persons)],
            "keypoint_names": list(KEYPOINTS), "bundle_id": bundle,
            "judgement": {"score": round(score, 4), "reasons": reasons, "decision": decision, "audit": audit,
                          "doubt": round(rng.random() * 3, 4)},
            "annotated_at": at}


def build(root: Path, n: int, now: float | None = None, seed: int = 0, files: int = 0,
          persons: tuple[int, int] = (1, 3), fast: bool = False) -> Store:
    """A store of ``n`` image rows over the year before ``now`` (module doc); returns it open.
    ``fast``: one record per decision and number of persons, its ids replaced (for tests: the
    rows and their sizes are the same, the points are not drawn for each)."""
    rng = random.Random(seed)
    templates: dict[tuple, str] = {}
    now = time.time() if now is None else now
    store = Store(Path(root), clock=lambda: now)
    start = now - 365 * DAY
    times = sorted(rng.uniform(start, now - 60) for _ in range(n))
    images, transitions, counters = [], [], {}
    session = None
    sessions_left = 0
    for k, at in enumerate(times):
        if sessions_left <= 0:  # a recording: one camera, a few hundred frames
            camera = rng.choice(CAMERAS)
            session = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime(at))
            sessions_left = rng.randint(100, 600)
        sessions_left -= 1
        image_id = f"{rng.getrandbits(256):064x}"
        path = f"{camera}/{session}/frame_{k:06d}.jpg"
        source = f"drop:{path}"
        meta = {"path": path, "size": rng.randint(40_000, 200_000), "mtime": at - 1, "camera": camera}
        month = int((at - start) // (30.5 * DAY))
        bundle = f"cabin-2024-{month:02d}-{month * 7919 % 65536:04x}"
        age = now - at
        u = rng.random()
        if age < 120 and u < 0.5:  # the newest few: not annotated yet
            state = RECEIVED
        elif u < 0.004:
            state = FAILED
        elif u < 0.054:
            state = REVIEWED if age > 3 * DAY else (UPLOADED if age > DAY else REVIEW_PENDING)
        else:
            state = AUTO_ACCEPTED
        done = at + rng.uniform(0.2, 3.0)
        rows_t = [(image_id, None, RECEIVED, at, None, source)]
        record = decision = score = None
        reasons: list[str] = []
        audit = False
        pruned_at = None
        updated = at
        error = None
        if state != RECEIVED and state != FAILED:
            review = state in (REVIEWED, UPLOADED, REVIEW_PENDING)
            audit = review and rng.random() < 0.1
            score = rng.uniform(0.5, 1) if not review or audit else rng.uniform(0, 0.5) ** 2
            reasons = (["audit"] if audit else ["low_score", "few_keypoints"][:rng.randint(1, 2)]) if review else \
                rng.choice(([], [], [], ["low_score", "near_duplicate"], ["low_score", "outranked"],
                            ["low_score", "session_reviewed"]))
            decision = "review" if review else "auto_accepted"
            if fast:
                key = (decision, rng.randint(*persons))
                if key not in templates:
                    templates[key] = json.dumps(_record(rng, "@ID@", "@SOURCE@", "@BUNDLE@", decision, score,
                                                        reasons, audit, done, key[1]))
                record = templates[key].replace("@ID@", image_id).replace("@SOURCE@", source) \
                    .replace("@BUNDLE@", bundle)
            else:
                record = _record(rng, image_id, source, bundle, decision, score, reasons, audit, done,
                                 rng.randint(*persons))
            owner = "host-1234/w0"
            target = REVIEW_PENDING if review else AUTO_ACCEPTED
            rows_t += [(image_id, RECEIVED, "annotated", done, owner, bundle),
                       (image_id, "annotated", target, done, owner, ",".join(reasons) or None)]
            updated = done
            counters["annotated"] = counters.get("annotated", 0) + 1
            if review:
                for name in (time.strftime("review:hour:%Y%m%d%H", time.gmtime(done)),
                             time.strftime("review:day:%Y%m%d", time.gmtime(done)),
                             "review:session:" + json.dumps([camera, session])):
                    counters[name] = counters.get(name, 0) + 1
            if state in (UPLOADED, REVIEWED):
                updated = done + rng.uniform(60, 3600)
                meta = {**meta, "upload": {"batch": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(updated)) + "-000001",
                                           "key": f"images/{image_id}.jpg"}}
                rows_t.append((image_id, REVIEW_PENDING, UPLOADED, updated, None, None))
            if state == REVIEWED:
                updated += rng.uniform(DAY, 2 * DAY)
                rows_t.append((image_id, UPLOADED, REVIEWED, updated, None, None))
            prune_at = done + 30 * DAY + rng.uniform(0, DAY)  # daily retention passes, 30 days
            if state == AUTO_ACCEPTED and prune_at < now:
                pruned_at = updated = prune_at
                rows_t.append((image_id, AUTO_ACCEPTED, AUTO_ACCEPTED, pruned_at, None, PRUNED_NOTE))
        elif state == FAILED:
            error = "cannot decode image: truncated JPEG"
            updated = done
            rows_t.append((image_id, RECEIVED, FAILED, done, "host-1234/w0", error))
            counters["failed"] = counters.get("failed", 0) + 1
        images.append((image_id, state, source, json.dumps(meta), camera, 1280 if record else None,
                       720 if record else None, record if isinstance(record, str) or record is None else json.dumps(record), decision, score,
                       json.dumps(reasons), int(audit), bundle if record else None, error, None, None,
                       0 if state == RECEIVED else 1, at, updated, pruned_at))
        transitions += rows_t
    transitions.sort(key=lambda t: t[3])
    store._conn().execute("PRAGMA synchronous=OFF")  # a bulk load of a throw-away store
    with store.transaction() as db:
        db.executemany("INSERT INTO images (image_id, state, source, meta, camera, width, height, record, decision, "
                       "score, reasons, audit, bundle_id, error, lease_owner, lease_expires, attempts, received_at, "
                       "updated_at, pruned_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", images)
        db.executemany("INSERT INTO transitions (image_id, from_state, to_state, at, owner, note) "
                       "VALUES (?,?,?,?,?,?)", transitions)
        db.executemany("INSERT INTO counters (name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", list(counters.items()))
    store._conn().execute("PRAGMA synchronous=FULL")
    for row in images[len(images) - files:] if files else ():
        if row[-1] is None:
            path = image_file(Path(root), row[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xff\xd8" + row[0].encode())
    return store


def _timed(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def operations(store: Store) -> dict[str, Callable[[], object]]:
    """What a user or the daemon does against the store, each as a call (the same on any size)."""
    newest = store.newest(1)[0]
    bundle = newest.bundle_id or ""
    rows, cursor = store.list(state=AUTO_ACCEPTED, limit=100)
    mid = store.list(state=AUTO_ACCEPTED, limit=1, since=newest.received_at - 180 * DAY)[0][0]
    mid_cursor = f"{mid.received_at!r}|{mid.image_id}"
    seq = store.last_transition()
    counter = iter(range(10**9))

    def ingest() -> object:
        return store.ingest(f"new image {next(counter)} {time.time()}".encode(), "drop:cabin-front/s/x.jpg",
                            {"camera": "cabin-front", "path": "cabin-front/s/x.jpg"})

    def page(state: str | None = None, decision: str | None = None, after: str | None = None) -> Callable[[], object]:
        return lambda: store.list(state=state, decision=decision, limit=100, after=after)

    return {
        "ingest one image": ingest,
        "get by id": lambda: store.get(newest.image_id),
        "show by 12-digit prefix": lambda: store.find(newest.image_id[:12]),
        "show --latest 20": lambda: store.newest(20),
        "show --latest 20 --camera (rare)": lambda: store.newest(20, camera="no-such-camera"),
        "claim (start-up recovery)": lambda: store.claim("bench/w0", 8),
        "judge: budget counters": lambda: [store.counter(k) for k in ("review:hour:2024010100", "review:day:20240101")],
        "start: recent_scores(current bundle, 2000)": lambda: store.recent_scores(bundle, 2000),
        "start: recent_scores(new bundle, 2000)": lambda: store.recent_scores("a-bundle-never-used", 2000),
        "start: latest_per_camera(review, 64)": lambda: store.latest_per_camera("review", 64),
        "List page 1 (no filter)": page(),
        "List page 1 state=auto_accepted": page(AUTO_ACCEPTED),
        "List page, cursor mid-year, state=auto_accepted": page(AUTO_ACCEPTED, after=mid_cursor),
        "List page, cursor mid-year, no filter": page(after=mid_cursor),
        "List page 2 decision=review": page(decision="review", after=cursor),
        "sync: review_pending page": page(REVIEW_PENDING),
        "sync: entered(auto_accepted) since last": lambda: store.entered(AUTO_ACCEPTED, after=seq, limit=500),
        "status / metrics: counts()": store.counts,
        "prune dry run (30 d)": lambda: store.pruned_bytes(newest.received_at - 30 * DAY),
        "prune pass (30 d, nothing new)": lambda: store.prune_auto_images(newest.received_at - 30 * DAY),
        "sweep_pruned (last pass)": lambda: store.sweep_pruned(newest.received_at - 3600),
    }


def plans(store: Store) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of the store's queries that run per image or per pass."""
    db = store._conn()
    queries = {
        "list state + cursor": ("SELECT * FROM images WHERE state = ? AND (received_at > ? OR (received_at = ? AND "
                                "image_id > ?)) ORDER BY received_at, image_id LIMIT ?", ("x", 0, 0, "", 1)),
    }
    return {k: [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + q, a)] for k, (q, a) in queries.items()}


def main(argv: list[str]) -> int:
    sizes = [10_000, *(int(a) for a in argv)] if argv else [10_000, 200_000]
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            t = time.perf_counter()
            store = build(Path(tmp) / f"s{n}", n, files=2000)
            print(f"built {n} rows in {time.perf_counter() - t:.1f} s "
                  f"({(Path(tmp) / f's{n}' / 'store.sqlite3').stat().st_size / 1e6:.0f} MB)", flush=True)
            clock = store.clock
            store.close()
            Store(Path(tmp) / f"s{n}", clock=clock).close()  # the bulk load's WAL checkpointed
            db = sqlite3.connect(Path(tmp) / f"s{n}" / "store.sqlite3")
            db.executescript("DROP INDEX images_by_bundle; DROP INDEX images_by_camera; DROP TABLE state_counts; "
                             "DROP TRIGGER state_counts_insert; DROP TRIGGER state_counts_delete; "
                             "DROP TRIGGER state_counts_update;")
            db.close()
            for what in ("first open of an older store (indexes, counts)", "open"):
                t = time.perf_counter()
                store = Store(Path(tmp) / f"s{n}", clock=clock)
                print(f"  {what}: {1000 * (time.perf_counter() - t):.1f} ms", flush=True)
                if what != "open":
                    store.close()
            results[n] = {name: _timed(fn) for name, fn in operations(store).items()}
            store.close()
    small, *large = sizes
    print(f"{'operation':<50} " + " ".join(f"{n:>12,}" for n in sizes) + "   ratio")
    for name in results[small]:
        cells = " ".join(f"{1000 * results[n][name]:>10.2f}ms" for n in sizes)
        ratio = results[large[-1]][name] / max(results[small][name], 1e-6) if large else 1.0
        print(f"{name:<50} {cells}   x{ratio:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
