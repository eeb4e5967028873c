"""Sequence propagation: a reviewed frame's label carried to its session's near-identical auto frames."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.store import REVIEW_PENDING, UPLOADED, Store
from sync.dataset import Dataset, DatasetEntry
from sync.merge import Merger
from sync.propagate import Frame, propagate, sequence_of

from test_merge import _record, _reviewed


def _entry(image_id: str, origin: str, label: dict, holdout: bool = False) -> DatasetEntry:
    return DatasetEntry(image_id, origin, label, "h-" + image_id, {"origin": "human" if origin == "reviewed" else "auto"},
                        None, None, None, False, holdout, 0.0)


def _label(x: float, width: int = 640) -> dict:
    return {"width": width, "height": 480, "heads": [[x, 10.0, x + 50, 60.0]], "persons": []}


def test_propagate_rules() -> None:
    s1, s2 = ("cam", "rec-1"), ("cam", "rec-2")
    entries = [_entry("r1", "reviewed", _label(1)), _entry("r2", "reviewed", _label(2)),
               _entry("held", "reviewed", _label(3), holdout=True),
               _entry("near", "auto", _label(90)), _entry("between", "auto", _label(91)),
               _entry("far", "auto", _label(92)), _entry("other", "auto", _label(93)),
               _entry("by_held", "auto", _label(94)), _entry("wide", "auto", _label(95, width=800)),
               _entry("lonely", "auto", _label(96))]
    frames = {"r1": Frame(s1, 0.0, 0b0), "r2": Frame(s1, 10.0, 0b111), "held": Frame(("cam", "rec-3"), 0.0, 0),
              "near": Frame(s1, 2.0, 0b1),            # 1 bit from r1, 2 from r2; r1 is nearer in time
              "between": Frame(s1, 9.0, 0b1),         # nearer r2 in time (2 bits from it): r2 wins
              "far": Frame(s1, 1.0, 0xFFFF),  # 16 and 13 bits from them: keeps its label
              "other": Frame(s2, 0.0, 0b0),           # another session: keeps its label
              "by_held": Frame(("cam", "rec-3"), 1.0, 0),  # only a hold-out frame in its session
              "wide": Frame(s1, 0.0, 0b0)}            # another image size
    out, n = propagate(entries, frames, max_distance=10)
    got = {e.image_id: e for e in out}
    assert n == 2 and [e.image_id for e in out] == [e.image_id for e in entries]
    assert got["near"].label == _label(1) and got["near"].provenance["propagated_from"] == "r1"
    assert got["near"].provenance["propagation_distance"] == 1 and got["near"].origin == "auto"
    assert got["between"].label == _label(2) and got["between"].provenance["propagated_from"] == "r2"
    for name, x in (("far", 92), ("other", 93), ("by_held", 94), ("lonely", 96)):
        assert got[name].label == _label(x) and "propagated_from" not in got[name].provenance
    assert got["wide"].label == _label(95, width=800)
    assert got["r1"] == entries[0]
    assert propagate(entries, frames, max_distance=0)[1] == 0
    with pytest.raises(ValueError, match="0..64"):
        propagate(entries, frames, max_distance=65)


@pytest.mark.parametrize("meta, camera, expect", [
    ({"session": "rec-7", "capture_time": 5.0}, "cam", (("cam", "rec-7"), 5.0)),
    ({"path": "a_pillar/drive-12/000001.jpg", "mtime": 3.0}, "a_pillar", (("a_pillar", "drive-12"), 3.0)),
    ({"path": "a_pillar/000001.jpg", "mtime": 3.0}, "a_pillar", None),
    ({"path": "000001.jpg"}, None, None),
    ({}, "cam", None),
])
def test_sequence_of(meta: dict, camera: str | None, expect: tuple | None) -> None:
    assert sequence_of(meta, camera) == expect


def _frame(shift: int, seed: int) -> bytes:
    """A smooth synthetic frame; ``shift`` moves a bright blob a little (one recording)."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 255, (6, 8), dtype=np.uint8), (320, 240), interpolation=cv2.INTER_CUBIC)
    img = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
    cv2.circle(img, (120 + shift, 120), 30, (255, 255, 255), -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def test_export_propagates_within_a_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the store, the merge and ``annotator dataset export --propagate``."""
    from sync.dataset_cli import register

    store = Store(tmp_path / "store")
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)

    def add(data: bytes, meta: dict, decision: str) -> str:
        image_id, _ = store.ingest(data, "test", meta)
        store.claim("w")
        store.complete(image_id, "w", _record(image_id), "b-1", decision, 0.3, ["low_conf"], False)
        return image_id

    reviewed = add(_frame(0, 1), {"session": "rec-1", "camera": "cam", "capture_time": 0.0}, "review")
    sibling = add(_frame(3, 1), {"session": "rec-1", "camera": "cam", "capture_time": 1.0}, "auto_accepted")
    stranger = add(_frame(0, 2), {"session": "rec-1", "camera": "cam", "capture_time": 2.0}, "auto_accepted")
    no_session = add(_frame(1, 1), {"camera": "cam"}, "auto_accepted")
    store.set_state(reviewed, (REVIEW_PENDING,), UPLOADED)
    Merger(store, dataset).merge([_reviewed(reviewed, move=7.0)])
    dataset.close()
    store.close()

    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))
    common = ["--store-root", str(tmp_path / "store"), "--dataset-root", str(tmp_path / "dataset")]
    for out, extra in (("plain", []), ("prop", ["--propagate"])):
        args = parser.parse_args(["dataset", "export", str(tmp_path / out), *extra, *common])
        assert args.func(args) == 0
    assert "1 auto images took a reviewed frame's label" in capsys.readouterr().out

    def persons(out: str) -> dict[str, list]:
        coco = json.loads((tmp_path / out / "annotations.json").read_text())
        sha = {im["id"]: im["sha256"] for im in coco["images"]}
        got: dict[str, list] = {}
        for a in coco["annotations"]:
            if a["category_id"] == 1:
                got.setdefault(sha[a["image_id"]], []).append(a)
        return got

    plain, prop = persons("plain"), persons("prop")
    assert [a["keypoints"] for a in prop[sibling]] == [a["keypoints"] for a in prop[reviewed]]
    assert prop[sibling][0]["provenance"]["propagated_from"] == reviewed
    assert prop[sibling][0]["provenance"]["origin"] == "auto"
    assert [a["keypoints"] for a in plain[sibling]] != [a["keypoints"] for a in plain[reviewed]]
    for other in (stranger, no_session):  # another scene in the session; a frame without a session
        assert prop[other] == plain[other]
    exported = json.loads((tmp_path / "prop" / "annotations.json").read_text())
    assert exported["info"]["propagation"] == {"max_distance": 10, "images": 1}
    from exporter.mix import propagated_images  # what `annotator train --propagated-weight` weighs

    assert {im["sha256"] for im in exported["images"] if im["id"] in propagated_images(exported)} == {sibling}

    with pytest.raises(SystemExit):
        parser.parse_args(["dataset", "export", str(tmp_path / "x"), "--propagate", "70", *common])
    assert "expected dHash bits" in capsys.readouterr().err
