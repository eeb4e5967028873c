"""The closed loop on one machine, through the product's own commands.

1. A small real bundle (3 models, 1 epoch at 96 px on 24 synthetic images) is adopted as the
   box's current model (``annotator models adopt``); ``annotator serve`` runs on it.
2. A batch of 12 synthetic images is dropped into the drop folder; the judge (threshold 0.5,
   no audit, no near-duplicate rule, a review budget of 8 per hour) sends 8 to review and
   auto-accepts the rest (the budget keeps the split fixed whatever the tiny model predicts).
3. ``annotator sync --once`` uploads them to S3 (moto on loopback) with a Ground Truth input
   manifest; a simulated reviewer answers from GROUND TRUTH (the synthetic labels of exactly
   those images) with output-manifest lines made by the real consolidation Lambda.
4. ``annotator sync --once`` merges; ``annotator dataset export``; ``annotator train --init
   current --publish REGISTRY`` retrains from the bundle in use and publishes.
5. ``annotator sync --once`` pulls, checks (checksums, validation gate on the reviewed
   hold-out images) and hot-swaps via ReloadModels; GetStatus names the new bundle and the
   next images dropped are labelled by it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "sync"))  # the sync tests' helpers

from gtworker import answer, output_line  # noqa: E402
from procs import command_env, free_port, start_serve, wait_for  # noqa: E402
from s3servers import ACCESS_KEY, SECRET_KEY, MotoControl  # noqa: E402
from service.client import AnnotatorClient  # noqa: E402
from service.store import Store  # noqa: E402
from sync.groundtruth import OUTPUT_MANIFEST, job_name_for  # noqa: E402
from sync.review import ReviewedKeypoint, ReviewedPerson  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.train]
REPO = Path(__file__).resolve().parents[1]
DONE = ("auto_accepted", "review_pending")
FLAGS = {2: "visible", 1: "occluded", 0: "outside"}


def env() -> dict[str, str]:
    return command_env(ACCESS_KEY, SECRET_KEY)


def annotator(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"annotator {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc



@pytest.fixture(scope="module")
def moto() -> Iterator[MotoControl]:
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    server = MotoControl()
    yield server
    server.stop()


def ground_truth(synth: Path) -> dict[str, dict[str, Any]]:
    """sha256 of each synthetic image's bytes -> its COCO image entry and annotations."""
    coco = json.loads((synth / "annotations.json").read_text())
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    person = next(c for c in coco["categories"] if c.get("keypoints"))
    out = {}
    for im in coco["images"]:
        digest = hashlib.sha256((synth / "images" / im["file_name"]).read_bytes()).hexdigest()
        out[digest] = {"image": im, "annotations": anns.get(im["id"], []), "names": person["keypoints"],
                       "person": person["id"]}
    return out


def reviewer_answer(truth: dict[str, Any]) -> dict[str, Any]:
    """The crowd-form answer of a worker who draws the ground truth of one image."""
    heads, persons = [], []
    for a in truth["annotations"]:
        x, y, w, h = a["bbox"]
        if a["category_id"] != truth["person"]:
            heads.append((x, y, x + w, y + h))
            continue
        k = a["keypoints"]
        points = tuple(ReviewedKeypoint(float(k[i]), float(k[i + 1]), FLAGS[int(k[i + 2])])  # type: ignore[arg-type]
                       for i in range(0, len(k), 3))
        persons.append(ReviewedPerson((x, y, x + w, y + h), points))
    size = (truth["image"]["width"], truth["image"]["height"])
    return answer(heads, persons, truth["names"], size)


def write_config(tmp_path: Path, bucket: str, endpoint: str, port: int) -> Path:
    config = tmp_path / "annotator.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
[store]
root = "store"
min_free_mb = 0
[drop]
folder = "drop"
stable_seconds = 0.0
poll_interval = 0.1
[engine]
bundle = "store/models/current"
batch_size = 4
workers = 1
threads = 1
[judge]
threshold = 0.5
audit_fraction = 0.0
near_duplicate = false
hourly_budget = 8
[sync]
appliance_id = "box-1"
batch_size = 100
poll_interval = 0.1
retry_base = 0.05
retry_cap = 0.5
[sync.target]
kind = "s3"
bucket = "{bucket}"
prefix = "edge"
endpoint_url = "{endpoint}"
region = "us-east-1"
[sync.review]
kind = "groundtruth"
collect_interval = 0
[sync.review.groundtruth]
output_prefix = "gt-output"
[sync.dataset]
holdout_fraction = 0.25
[sync.models]
margin = 1.0
min_holdout = 1
poll_interval = 0
[sync.models.registry]
kind = "local"
root = "registry"
""")
    return config


def drop_images(drop: Path, files: list[Path], tag: str) -> list[str]:
    """Copy images into the drop folder atomically; their sha256 image ids."""
    ids = []
    for n, src in enumerate(files):
        data = src.read_bytes()
        (drop / f".{tag}{n}.part").write_bytes(data)
        os.replace(drop / f".{tag}{n}.part", drop / f"{tag}-{n:02d}.jpg")
        ids.append(hashlib.sha256(data).hexdigest())
    return ids


def test_closed_loop_retrains_on_reviewed_ground_truth_and_hot_swaps(
        tmp_path: Path, moto: MotoControl, ultralytics_offline: Path) -> None:
    from exporter.synth import generate
    from exporter.train import TrainConfig, train_bundle

    t0 = time.monotonic()
    first = train_bundle(TrainConfig(
        annotations=generate(tmp_path / "train0", 24, seed=11) / "annotations.json", images=tmp_path / "train0" / "images",
        out=tmp_path / "bundle0", work=tmp_path / "bundle0.work", epochs=1, imgsz=96, batch=8, workers=0,
        val_fraction=0.25))
    batch = generate(tmp_path / "batch", 12, seed=12)
    later = generate(tmp_path / "later", 2, seed=13)
    truth = ground_truth(batch)
    bucket = moto.new_bucket()
    config = write_config(tmp_path, bucket, moto.endpoint_url, free_port())
    (tmp_path / "drop").mkdir()
    annotator("models", "adopt", str(first.path), "--config", str(config))
    t_setup = time.monotonic() - t0

    log = tmp_path / "serve.log"
    proc = start_serve(config, log, cwd=tmp_path, env=env())
    store = Store(tmp_path / "store")
    try:
        wait_for(lambda: re.search(r"serving\b.*\bon port \d+", log.read_text()) is not None, proc, log)
        ids = drop_images(tmp_path / "drop", sorted((batch / "images").glob("*.jpg")), "batch")
        wait_for(lambda: sum(store.counts()[s] for s in DONE) == len(ids), proc, log)
        review = [i for i in ids if store.get(i).state == "review_pending"]  # type: ignore[union-attr]
        assert len(review) == 8, "the judge should send 8 images (the hourly budget) to review"
        assert all(store.get(i).record["bundle_id"] == first.id for i in ids)  # type: ignore[union-attr]

        # Upload + Ground Truth input manifest; the reviewer answers from ground truth.
        annotator("sync", "--config", str(config), "--once")
        s3 = moto.client()
        (manifest,) = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="edge/manifests/")["Contents"]]
        lines = [json.loads(t) for t in s3.get_object(Bucket=bucket, Key=manifest)["Body"].read().decode().splitlines()]
        assert sorted(line["image-id"] for line in lines) == sorted(review)
        job = job_name_for("er-box-1", manifest.rsplit("/", 1)[1].removesuffix(".manifest"))
        out = [json.dumps(output_line(line, reviewer_answer(truth[line["image-id"]]), job)) for line in lines]
        s3.put_object(Bucket=bucket, Key=f"edge/gt-output/{job}/{OUTPUT_MANIFEST}", Body="\n".join(out).encode())

        annotator("sync", "--config", str(config), "--once")  # collect + merge
        assert all(store.get(i).state == "reviewed" for i in review)  # type: ignore[union-attr]
        export = tmp_path / "export"
        annotator("dataset", "export", str(export), "--config", str(config))
        coco = json.loads((export / "annotations.json").read_text())
        assert coco["images"] and {im["origin"] for im in coco["images"]} <= {"reviewed", "auto"}
        reviewed = [im for im in coco["images"] if im["origin"] == "reviewed"]
        assert reviewed and len(coco["images"]) - len(reviewed) == 4  # hold-out reviewed images left out
        person_anns = [a for a in coco["annotations"] if a["image_id"] == reviewed[0]["id"] and "keypoints" in a]
        gt_persons = [a for a in truth[reviewed[0]["sha256"]]["annotations"] if "keypoints" in a]
        assert len(person_anns) == len(gt_persons)  # the reviewer's (ground-truth) labels, not the model's
        assert all(a["provenance"]["origin"] == "human" for a in person_anns)

        t1 = time.monotonic()
        trained = annotator("train", str(export), str(tmp_path / "bundle1"), "--init", "current", "--config",
                            str(config), "--epochs", "1", "--imgsz", "96", "--batch", "8", "--workers", "0",
                            "--val-fraction", "0.25", "--auto-weight", "0.5", "--publish", str(tmp_path / "registry"))
        t_train = time.monotonic() - t1
        manifest1 = json.loads((tmp_path / "bundle1" / "bundle.json").read_text())
        new_id = manifest1["id"]
        assert f"published {new_id}" in trained.stdout
        assert manifest1["lineage"]["parent_bundle"] == first.id
        assert manifest1["lineage"]["dataset"]["version"] == coco["info"]["dataset_version"]
        assert manifest1["lineage"]["init"].endswith(first.id)  # the installed copy of the bundle in use
        mix = manifest1["lineage"]["dataset"]["mix"]
        assert mix["auto_weight"] == 0.5 and mix["images"] == {"reviewed": len(reviewed), "auto": 4}
        assert (tmp_path / "registry" / "bundles" / new_id / "weights" / "pose_main.pt").is_file()

        pulled = annotator("sync", "--config", str(config), "--once")  # pull, gate, ReloadModels
        gate = next(line for line in pulled.stderr.splitlines() if f"bundle {new_id} passed the gate" in line)
        assert "reviewed hold-out images" in gate and "checksums only" not in gate, gate  # quality compared
        assert (tmp_path / "store" / "models" / "current").resolve().name == new_id
        assert (tmp_path / "store" / "models" / "current" / "weights" / "head.pt").is_file()
        port = int(config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.status().bundle_id == new_id

        next_ids = drop_images(tmp_path / "drop", sorted((later / "images").glob("*.jpg")), "later")
        wait_for(lambda: all(store.get(i) is not None and store.get(i).state in DONE for i in next_ids),  # type: ignore[union-attr]
             proc, log)
        assert [store.get(i).record["bundle_id"] for i in next_ids] == [new_id] * len(next_ids)  # type: ignore[union-attr]
        print(f"closed loop: setup {t_setup:.0f} s, retrain {t_train:.0f} s, total {time.monotonic() - t0:.0f} s; "
              f"{len(review)} of {len(ids)} images reviewed")
    finally:
        store.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
