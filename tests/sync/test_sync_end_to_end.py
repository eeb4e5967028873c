"""The whole sync path through the product's commands, as separate processes.

A daemon store holds review-pending and auto-accepted images (``reviewdata.fill_store``:
``Store.ingest/claim/complete`` with ``Prediction(...).to_json()`` records). Then:

1. ``annotator sync --config F --once`` uploads the review images, their pre-annotations and
   one manifest to a real S3 server (moto on loopback) and submits the batch to the review
   backend; a second run sends and submits nothing again;
2. the test plays the reviewer (Ground Truth: an output manifest in the custom format made by
   the real consolidation Lambda; Label Studio: annotations posted to a real server);
3. ``annotator sync --once`` collects and merges: images ``reviewed``, a dataset version
   recorded, mistakenness stored;
4. ``annotator dataset export OUT`` writes COCO with the reviewed labels and their provenance.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import lsserver
from gtworker import answer, output_line
from procs import command_env
from reviewdata import fill_store
from s3servers import ACCESS_KEY, SECRET_KEY, S3Server
from service.store import Store
from sync.dataset import Dataset
from sync.groundtruth import OUTPUT_MANIFEST, job_name_for
from sync.journal import Journal
from sync.labelstudio import prediction_result
from sync.labelstudio_client import LabelStudioClient
from sync.review import ReviewedKeypoint, ReviewedPerson

REPO = Path(__file__).resolve().parents[2]
SHIFT = 3.0  # pixels the reviewer moves the first image's head box to the right


def annotator(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``annotator ARGS`` (the console script's ``service.cli:main``) as a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO,
                          env=command_env(ACCESS_KEY, SECRET_KEY, env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"annotator {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def bucket_objects(server: S3Server, bucket: str) -> dict[str, str]:
    """Key -> ETag of every object in the bucket."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def reviewer_persons(kpts: dict[str, Any], change_first: bool) -> tuple[list[str], list[ReviewedPerson]]:
    """The persons of a manifest's ``auto-kpts`` as a reviewer submits them; ``change_first``
    turns the first visible point of the first person to ``occluded``."""
    names = [k["label"] for k in kpts["persons"][0]["keypoints"]] if kpts["persons"] else []
    persons = []
    for n, p in enumerate(kpts["persons"]):
        points = [ReviewedKeypoint(k["x"], k["y"], k["visibility"]) for k in p["keypoints"]]
        if change_first and n == 0:
            j = next(i for i, k in enumerate(points) if k.visibility == "visible")
            points[j] = ReviewedKeypoint(points[j].x, points[j].y, "occluded")
        persons.append(ReviewedPerson(tuple(p["box"]), tuple(points)))  # type: ignore[arg-type]
    return names, persons


def check_merged_and_exported(tmp_path: Path, config: Path, store_root: Path, changed: str, accepted: str,
                              waiting: str, backend: str, reviewer: str | None) -> None:
    """States, dataset version, mistakenness, and the COCO export after the collecting run."""
    store = Store(store_root)
    try:
        assert {i: store.get(i).state for i in (changed, accepted, waiting)} == {  # type: ignore[union-attr]
            changed: "reviewed", accepted: "reviewed", waiting: "uploaded"}
    finally:
        store.close()
    dataset = Dataset(store_root / "dataset")
    try:
        assert dataset.versions(), "merging must record a dataset version"
        moved, same = dataset.get(changed), dataset.get(accepted)
        assert moved is not None and same is not None and moved.origin == same.origin == "reviewed"
        assert moved.mistakes is not None and moved.mistakes["score"] > 0
        # Accepted as shown: only the transport's rounding (whole-pixel boxes in a manifest) remains.
        assert same.mistakes is not None and same.mistakes["changed_points"] == 0
        assert same.mistakes["score"] < moved.mistakes["score"] and moved.mistakes["changed_points"] >= 1
        assert moved.provenance["backend"] == backend and moved.provenance["adjusted"] is True
        assert same.provenance["adjusted"] is False
        assert moved.provenance["reviewer"] == reviewer and moved.provenance["bundle_id"] == "bundle-1"
        version = dataset.version()
    finally:
        dataset.close()
    out = tmp_path / "export"
    annotator("dataset", "export", str(out), "--config", str(config))
    coco = json.loads((out / "annotations.json").read_text())
    assert coco["info"]["dataset_version"] == version
    by_sha = {img["sha256"]: img for img in coco["images"]}
    assert by_sha[changed]["origin"] == by_sha[accepted]["origin"] == "reviewed"
    assert waiting not in by_sha  # not reviewed yet: not in the training set
    anns = [a for a in coco["annotations"] if a["image_id"] == by_sha[changed]["id"]]
    assert anns and all(a["provenance"]["backend"] == backend and a["provenance"]["origin"] == "human" for a in anns)
    heads = [a for a in anns if "keypoints" not in a]
    assert heads and heads[0]["bbox"][0] == pytest.approx(0.3 * 64 + SHIFT, abs=1.0)  # the reviewer's box
    assert (out / "images" / by_sha[changed]["file_name"]).is_file()


def test_groundtruth_round_trip_through_the_commands(moto_server: S3Server, tmp_path: Path) -> None:
    store, review, auto = fill_store(tmp_path / "store", review=3, auto=1)
    store.close()
    bucket = moto_server.new_bucket()
    config = tmp_path / "annotator.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:50051"
[store]
root = "store"
[sync]
appliance_id = "box-1"
batch_size = 10
poll_interval = 0.1
retry_base = 0.05
retry_cap = 0.5
[sync.target]
kind = "s3"
bucket = "{bucket}"
prefix = "edge"
endpoint_url = "{moto_server.endpoint_url}"
region = "us-east-1"
[sync.review]
kind = "groundtruth"
collect_interval = 0
[sync.review.groundtruth]
output_prefix = "gt-output"
[sync.dataset]
holdout_fraction = 0.0
""")
    annotator("sync", "--config", str(config), "--once")
    first = bucket_objects(moto_server, bucket)
    annotator("sync", "--config", str(config), "--once")
    assert bucket_objects(moto_server, bucket) == first  # nothing sent twice
    manifests = [k for k in first if k.endswith(".manifest")]
    assert len(manifests) == 1 and manifests[0].startswith("edge/manifests/box-1/")
    assert sum(k.startswith("edge/images/") for k in first) == 3
    assert sum(k.startswith("edge/preannotations/box-1/") for k in first) == 3
    body = moto_server.client().get_object(Bucket=bucket, Key=manifests[0])["Body"].read().decode()
    lines = {json.loads(t)["image-id"]: json.loads(t) for t in body.splitlines()}
    assert sorted(lines) == sorted(review)
    batch = manifests[0].rsplit("/", 1)[1].removesuffix(".manifest")
    journal = Journal(tmp_path / "store" / "sync.sqlite3", clock=lambda: 0.0)
    assert journal.submissions() == [(batch, "groundtruth", 3)]  # submitted once, recorded
    journal.close()

    # Ground Truth's side: a worker corrects one image, accepts another, leaves the third.
    changed, accepted, waiting = review
    job = job_name_for("er-box-1", batch)
    out = []
    for image_id, change in ((changed, True), (accepted, False)):
        line = lines[image_id]
        heads = [(a["left"], a["top"], a["left"] + a["width"], a["top"] + a["height"])
                 for a in line["auto-head"]["annotations"]]
        if change:
            heads[0] = (heads[0][0] + SHIFT, heads[0][1], heads[0][2] + SHIFT, heads[0][3])
        names, persons = reviewer_persons(line["auto-kpts"], change)
        size = (line["auto-kpts"]["image_size"]["width"], line["auto-kpts"]["image_size"]["height"])
        out.append(json.dumps(output_line(line, answer(heads, persons, names, size), job)))
    moto_server.client().put_object(Bucket=bucket, Key=f"edge/gt-output/{job}/{OUTPUT_MANIFEST}",
                                    Body=("\n".join(out) + "\n").encode())

    annotator("sync", "--config", str(config), "--once")
    check_merged_and_exported(tmp_path, config, tmp_path / "store", changed, accepted, waiting,
                              "groundtruth", "worker-42")
    assert bucket_objects(moto_server, bucket).keys() - first.keys() == {f"edge/gt-output/{job}/{OUTPUT_MANIFEST}"}


def test_label_studio_round_trip_through_the_commands(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    store_root = ls_server.document_root / f"store-{uuid.uuid4().hex[:8]}"  # Label Studio serves the store
    store, review, auto = fill_store(store_root, review=3, auto=1)
    store.close()
    title = f"edge e2e {uuid.uuid4().hex[:8]}"
    config = tmp_path / "annotator.toml"
    config.write_text(f"""
[store]
root = "{store_root}"
[sync]
appliance_id = "box-2"
poll_interval = 0.1
[sync.review]
kind = "labelstudio"
collect_interval = 0
[sync.review.labelstudio]
url = "{ls_server.url}"
project_title = "{title}"
document_root = "{ls_server.document_root}"
[sync.dataset]
holdout_fraction = 0.0
""")
    env = {"ANNOTATOR_LABEL_STUDIO_TOKEN": ls_server.token}
    runs = [annotator("sync", "--config", str(config), "--once", env=env) for _ in range(2)]
    assert all(ls_server.token not in r.stderr + r.stdout for r in runs)  # the token is never logged

    client = LabelStudioClient(ls_server.url, ls_server.token)
    (project,) = [p for p in client.pages("/api/projects/", "results", title=title) if p["title"] == title]
    tasks = {t["data"]["image_id"]: t for t in client.pages("/api/tasks/", "tasks", project=project["id"])}
    assert sorted(tasks) == sorted(review)  # each image imported once, despite two runs

    changed, accepted, waiting = review
    for image_id, change in ((changed, True), (accepted, False)):
        task = client.get(f"/api/tasks/{tasks[image_id]['id']}/")
        result = task["predictions"][0]["result"]
        if change:
            reader = Store(store_root)
            rec = reader.get(image_id).record  # type: ignore[union-attr]
            reader.close()
            rec = {**rec, "heads": [{**h, "box": [h["box"][0] + SHIFT, h["box"][1], h["box"][2] + SHIFT, h["box"][3]]}
                                    for h in rec["heads"]]}
            first = next(k for k in rec["persons"][0]["keypoints"] if k["visibility"] == "visible")
            first["visibility"] = "occluded"
            result = prediction_result(rec)
        client.post(f"/api/tasks/{task['id']}/annotations/", {
            "result": result, "was_cancelled": False, "lead_time": 3.0,
            "parent_prediction": task["predictions"][0]["id"]})

    annotator("sync", "--config", str(config), "--once", env=env)
    check_merged_and_exported(tmp_path, config, store_root, changed, accepted, waiting, "labelstudio", ls_server.user)
