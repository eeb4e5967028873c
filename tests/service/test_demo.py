"""The README's first command: ``annotator demo`` runs the main job end to end on the embedded default.

The daemon (drop folder, store, engine, judge, gRPC on loopback) annotates the shipped sample
images, the sync agent uploads the review-pending ones with their pre-annotations and a Ground
Truth input manifest into a local folder standing in for the bucket, and a second run into the
same folder adds nothing. The label-quality checks need the shipped demo bundle; the pipeline
checks run with it, or else with a real COCO-17 bundle built from YOLO11n-pose (train extra).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.bundle import load_bundle
from service.cli_daemon import DEMO_BUNDLE

SAMPLES = DEMO_BUNDLE.parent / "samples"
SHIPPED = (DEMO_BUNDLE / "bundle.json").is_file()
needs_demo_bundle = pytest.mark.skipif(not SHIPPED, reason="no demo bundle shipped")


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def bucket_files(out: Path) -> dict[str, bytes]:
    bucket = out / "bucket"
    return {p.relative_to(bucket).as_posix(): p.read_bytes() for p in bucket.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo_bundle(request: pytest.FixtureRequest) -> Path:
    """The shipped demo bundle, or a real COCO-17 two-model bundle where none is shipped."""
    if SHIPPED:
        return DEMO_BUNDLE
    return request.getfixturevalue("coco17_two_model_bundle").path


@needs_demo_bundle
def test_shipped_demo_bundle_verifies() -> None:
    b = load_bundle(DEMO_BUNDLE)
    assert set(b.models) == {"head", "pose_main", "pose_visible"}
    assert b.visibility_mode == "two_model"
    assert "calibrated" in b.thresholds.method
    assert b.lineage["dataset"]["version"].startswith("sha256:")


@needs_demo_bundle
def test_annotator_demo_labels_the_samples_sensibly(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_demo(out)
    assert "auto-accepted" in proc.stdout and "Ground Truth input manifest" in proc.stdout
    # its own drop folder, made before the daemon starts: not the first-start warning that
    # drop.folder may be wrong
    assert "did not exist and was made" not in proc.stdout + proc.stderr
    records = sorted((out / "annotations").glob("*.json"))
    assert len(records) == 12 and (out / "contact_sheet.png").stat().st_size > 10_000
    truth = json.loads((SAMPLES / "annotations.json").read_text())
    n_true_persons = sum(1 for a in truth["annotations"] if a["category_id"] == 1)
    n_true_heads = sum(1 for a in truth["annotations"] if a["category_id"] == 2)
    persons = heads = 0
    states: set[str] = set()
    for r in records:
        rec = json.loads(r.read_text())
        persons += len(rec["persons"])
        heads += len(rec["heads"])
        states |= {k["visibility"] for p in rec["persons"] for k in p["keypoints"]}
    # Sensible, not exact: within 20 % of the true counts, and all three states are used.
    assert abs(persons - n_true_persons) <= 0.2 * n_true_persons
    assert abs(heads - n_true_heads) <= 0.2 * n_true_heads
    assert states == {"visible", "occluded", "outside"}


def test_demo_sends_review_images_to_the_bucket_once(tmp_path: Path, demo_bundle: Path) -> None:
    out = tmp_path / "demo"
    proc = run_demo(out, "--bundle", str(demo_bundle))
    records = [json.loads(p.read_text()) for p in (out / "annotations").glob("*.json")]
    assert len(records) == 12 and len(list((out / "annotated").glob("*.png"))) == 12
    assert (out / "contact_sheet.png").stat().st_size > 10_000
    review = {r["image_id"] for r in records if r["judgement"]["decision"] == "review"}
    for name in {p.name for p in SAMPLES.glob("*.jpg")}:  # one table row per sample image
        assert name in proc.stdout

    files = bucket_files(out)
    images = {k for k in files if k.startswith("images/")}
    pre = {k for k in files if k.startswith("preannotations/demo/")}
    manifests = [k for k in files if k.startswith("manifests/demo/")]
    assert {Path(k).stem for k in images} == review
    assert {Path(k).stem for k in pre} == review
    assert set(files) == images | pre | set(manifests)
    if not review:  # nothing to review: nothing leaves the box, not even an empty manifest
        assert not manifests
        return
    assert len(manifests) == 1 and str(out / "bucket" / manifests[0]) in proc.stdout
    lines = [json.loads(x) for x in files[manifests[0]].decode().splitlines() if x.strip()]
    assert len(lines) == len(review)
    assert {line["image-id"] for line in lines} == review
    for line in lines:  # each line points at an uploaded image and names its pre-annotation's image
        assert line["source-ref"] == (out / "bucket" / f"images/{line['image-id']}.jpg").as_uri()
        assert f"preannotations/demo/{line['image-id']}.json" in pre
    for key in images:  # the uploaded bytes are the sample's bytes (no downscale configured)
        assert files[key] in {p.read_bytes() for p in SAMPLES.glob("*.jpg")}

    again = run_demo(out, "--bundle", str(demo_bundle))
    assert bucket_files(out) == files  # no duplicate, nothing rewritten
    assert "this run added nothing" in again.stdout
    assert len(list((out / "annotations").glob("*.json"))) == 12
    assert not [p for p in (out / "drop").iterdir() if p.is_file()]

    fresh = run_demo(out, "--bundle", str(demo_bundle), "--fresh")  # starts over: same content again
    assert "removed the earlier demo's files" in fresh.stdout
    assert {k for k in bucket_files(out) if not k.startswith("manifests/")} == images | pre
    assert len([k for k in bucket_files(out) if k.startswith("manifests/")]) == len(manifests)


def test_demo_without_a_bundle_says_what_to_pass(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--out", str(tmp_path / "d"),
                           "--bundle", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--bundle" in proc.stderr and "Traceback" not in proc.stderr


def test_the_progress_bar_is_redrawn_on_a_terminal_and_written_by_quarters_to_a_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Written to a log file (make demo > log, journald) every redraw ended up in one line
    (``\\r`` frames); there it is now a line a quarter."""
    import io

    from sync.demo_report import progress_bar

    class Stream(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    for tty in (True, False):
        stream = Stream(tty)
        monkeypatch.setattr("sys.stderr", stream)
        for done in range(1, 201):
            progress_bar("annotating", done, 200)
        text = stream.getvalue()
        if tty:
            assert text.count("\r") == 200
        else:
            assert "\r" not in text and text.count("annotating") == 4 and text.endswith("200/200")


def test_the_demo_table_keeps_its_columns_for_long_names_and_audit_picks_sent() -> None:
    from sync.demo_report import ImageLine, format_table

    lines = [ImageLine("cabin_front_0001.jpg", "annotated", "auto_accepted", False, 0.12, ("ok",), 1, 1, 17, 0, 0),
             ImageLine("a_long_recording_name_cam2_0042.png", "uploaded", "review", True, 0.87,
                       ("low head confidence",), 2, 2, 20, 10, 4)]
    head, _, *rows, _ = format_table(lines).splitlines()
    # HEAD: "review (audit) -> bucket" (24 characters) ran into the score's 21-character column
    at = head.index("score") + len("score")
    assert [r[at - 4:at] for r in rows] == ["0.12", "0.87"]
    assert all(len(r) == len(head) for r in rows)
