"""``annotator dataset export`` as a training run reads it: the reviewer's labels where they were
drawn, on images the real daemon labelled (EXIF-turned, decoded at reduced size), and a
``dataset_version`` that names the labels written."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from procs import REPO, command_env, serve_toml, start_serve, wait_for
from service.keypoints import CABIN19_NAMES
from service.store import REVIEW_PENDING, UPLOADED, Store
from sync.coco_export import export_dataset
from sync.dataset import Dataset, canonical_label
from sync.merge import Merger
from sync.review import ReviewedKeypoint, ReviewedLabel, ReviewedPerson

FLAG = {"visible": 2, "occluded": 1, "outside": 0}


def _turned_jpegs() -> dict[str, bytes]:
    """The first shipped sample upright, stored turned with EXIF orientation 6 and 8, and a
    large copy (2560x1920: the daemon decodes it at reduced size) stored turned (6)."""
    base = Image.open(sorted((REPO / "service" / "assets" / "samples").glob("*.jpg"))[0]).convert("RGB")
    big = base.resize((base.width * 4, base.height * 4))
    out = {}
    for name, upright, orientation in (("plain.jpg", base, 1), ("exif 6 ü.jpg", base, 6), ("exif8.jpg", base, 8),
                                       ("big exif6.jpg", big, 6)):
        stored = {1: upright, 6: upright.transpose(Image.Transpose.ROTATE_90),
                  8: upright.transpose(Image.Transpose.ROTATE_270)}[orientation]
        exif = Image.Exif()
        if orientation != 1:
            exif[0x0112] = orientation
        buf = io.BytesIO()
        stored.save(buf, "JPEG", exif=exif.tobytes(), quality=90)
        out[name] = buf.getvalue()
    return out


def test_reviewed_labels_leave_dataset_export_where_the_reviewer_drew_them(tmp_path: Path) -> None:
    """Real daemon, real JPEGs: a reviewer's points (in the upright image's pixels, as the
    review frame shows it) come out of ``annotator dataset export`` at the same pixels with the
    same flags, and each image entry's size is the file's size after EXIF orientation."""
    drop = tmp_path / "drop"
    drop.mkdir()
    for name, data in _turned_jpegs().items():
        (drop / name).write_bytes(data)
    (tmp_path / "serve.toml").write_text(serve_toml(tmp_path, REPO / "service" / "assets" / "demo_bundle"))
    proc = start_serve(tmp_path / "serve.toml", tmp_path / "serve.log", tmp_path)

    def annotated() -> bool:
        store = Store(tmp_path / "store")
        try:
            return sum(len(store.list(state=s, limit=100)[0]) for s in ("auto_accepted", REVIEW_PENDING)) == 4
        finally:
            store.close()

    try:
        wait_for(annotated, proc, tmp_path / "serve.log")
    finally:
        proc.terminate()
        proc.wait(30)
    store = Store(tmp_path / "store")
    dataset = Dataset(tmp_path / "store" / "dataset", holdout_fraction=0.0)
    drawn: dict[str, tuple[int, int, list[list[float]]]] = {}
    labels = []
    try:
        for state in ("auto_accepted", REVIEW_PENDING):
            for row in store.list(state=state, limit=100)[0]:
                assert store.set_state(row.image_id, (state,), UPLOADED)
                w, h = row.width, row.height
                assert (w, h) == ((2560, 1920) if "big" in row.source else (640, 480))
                points = tuple(ReviewedKeypoint(round(w * (0.1 + 0.04 * i), 2), round(h * (0.05 + 0.045 * i), 2),
                                                ("visible", "occluded", "outside")[i % 3]) for i in range(19))
                drawn[row.image_id] = (w, h, [[p.x, p.y, FLAG[p.visibility]] if FLAG[p.visibility] else [0, 0, 0]
                                              for p in points])
                labels.append(ReviewedLabel(row.image_id, w, h, ((w * 0.3, h * 0.1, w * 0.5, h * 0.3),),
                                            (ReviewedPerson((w * 0.05, h * 0.02, w * 0.95, h * 0.98), points),),
                                            "labelstudio", "p-1", 1_790_000_000.0, "ann", True, CABIN19_NAMES))
        assert sorted(Merger(store, dataset).merge(labels).merged) == sorted(drawn)
    finally:
        dataset.close()
        store.close()
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "service.cli", "dataset", "export", "--store-root", str(tmp_path / "store"),
                    str(out)], cwd=REPO, env=command_env(), check=True, capture_output=True, timeout=120)
    coco = json.loads((out / "annotations.json").read_text())
    assert {im["sha256"] for im in coco["images"]} == set(drawn)
    for im in coco["images"]:
        w, h, points = drawn[im["sha256"]]
        assert (im["width"], im["height"]) == (w, h) == ImageOps.exif_transpose(Image.open(out / "images" /
                                                                                         im["file_name"])).size
        [person] = [a for a in coco["annotations"] if a["image_id"] == im["id"] and a["category_id"] == 1]
        got = [person["keypoints"][i:i + 3] for i in range(0, len(person["keypoints"]), 3)]
        assert got == [[pytest.approx(x, abs=0.01), pytest.approx(y, abs=0.01), f] for x, y, f in points]
        assert person["num_keypoints"] == sum(1 for _, _, f in points if f)


class _AgentMergesMidExport:
    """The dataset as ``export_dataset`` reads it while the sync agent merges: another connection
    stores a new reviewed label of one image just before the export reads the labels."""

    def __init__(self, dataset: Dataset, root: Path, image_id: str) -> None:
        self.dataset, self.root, self.image_id = dataset, root, image_id

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the dataset's
        return getattr(self.dataset, name)

    def entries(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - Dataset.entries's signature
        agent = Dataset(self.root)
        try:
            agent.put_reviewed(self.image_id, canonical_label(640, 480, [[200.0, 10.0, 250.0, 60.0]], []),
                               {"reviewed_at": "2026-12-02T00:00:00Z"}, None, None, None, False)
        finally:
            agent.close()
        return self.dataset.entries(*args, **kwargs)


def test_dataset_version_names_the_labels_written_when_a_merge_lands_mid_export(tmp_path: Path) -> None:
    """``info.dataset_version`` (which ``annotator train`` writes into the bundle's provenance)
    was read apart from the labels: a merge landing in between (16 of 30 exports beside a real
    merging process) gave the version of other labels than the ones in the file."""
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 16)
    ids = [f"{i:064x}" for i in range(3)]
    for iid in ids:
        dataset.put_auto(iid, canonical_label(640, 480, [[1.0, 1.0, 20.0, 20.0]], []), {"origin": "auto"})
    dataset.put_reviewed(ids[0], canonical_label(640, 480, [[100.0, 10.0, 150.0, 60.0]], []),
                         {"reviewed_at": "2026-12-01T00:00:00Z"}, None, None, None, False)
    try:
        res = export_dataset(_AgentMergesMidExport(dataset, tmp_path / "dataset", ids[0]), lambda iid: image,
                             tmp_path / "out")
        coco = json.loads(res.annotations.read_text())
        [head] = [a for a in coco["annotations"] if a["image_id"] == 1]
        assert head["bbox"][0] == 200.0  # the agent's newer review is what was written
        assert coco["info"]["dataset_version"] == res.version == dataset.version()
    finally:
        dataset.close()
