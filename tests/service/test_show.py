"""``annotator show``: the store's images drawn with their labels, a reviewed label beside the model's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from procs import REPO, command_env
from service.imageio import decode_image
from service.store import Store


def _show(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "show", "--config", str(config), *args],
                          cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=120)


def test_show_draws_the_newest_images_and_a_review_beside_the_model(
        tmp_path: Path, make_config: Callable[..., Any], coco_people_photos: list[Path]) -> None:
    from service.daemon import Daemon
    from sync.dataset import Dataset, canonical_label

    daemon = Daemon(make_config())
    daemon.start()
    try:
        rows = [daemon.annotate_now(p.read_bytes(), f"test:{p.name}", {"camera": "cam1"}) for p in coco_people_photos[:3]]
    finally:
        daemon.close()
    with_people = next(r for r in rows if r.record and r.record["persons"])
    # A reviewer's label for that image: one head box, the person's points all visible.
    rec = with_people.record
    dataset = Dataset(tmp_path / "store" / "dataset")
    p0 = rec["persons"][0]
    label = canonical_label(rec["width"], rec["height"], [[10, 10, 60, 60]],
                            [(p0["box"], [(k["x"], k["y"], 2) for k in p0["keypoints"]])])
    dataset_names = dataset.schema.names
    if dataset_names != tuple(rec["keypoint_names"]):  # the dataset's schema (cabin 19) maps by name
        by_name = dict(zip(rec["keypoint_names"], label["persons"][0]["keypoints"]))
        label["persons"][0]["keypoints"] = [by_name.get(n, [0.0, 0.0, 0]) for n in dataset_names]
    dataset.put_reviewed(with_people.image_id, label, {"backend": "test", "job": "j", "reviewed_at": "2026-12-06"},
                         None, None, "review", False)
    dataset.close()
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n')

    out = tmp_path / "show"
    res = _show(config, "--out", str(out))
    assert res.returncode == 0, res.stderr
    for r in rows:
        assert r.image_id[:12] in res.stdout
        picture = cv2.imread(str(out / f"{r.image_id[:12]}.png"))
        plain = decode_image(_bytes(tmp_path, r.image_id), max_side_hint=1280).pixels
        assert picture is not None and picture.shape == plain.shape
        if r.record["persons"]:
            assert np.abs(picture.astype(int) - plain.astype(int)).sum() > 0  # something was drawn
    reviewed = cv2.imread(str(out / f"{with_people.image_id[:12]}.reviewed.png"))
    model = cv2.imread(str(out / f"{with_people.image_id[:12]}.png"))
    assert reviewed is not None and not np.array_equal(reviewed, model)
    assert (out / "contact_sheet.png").is_file() and "+ reviewed" in res.stdout
    assert "more images match" not in res.stdout
    two = _show(config, "--latest", "2", "--out", str(tmp_path / "two"))  # 2 of 3: said, not silently cut
    assert two.returncode == 0 and "the newest 2 shown; more images match: --latest N" in two.stdout, two.stdout
    assert len(list((tmp_path / "two").glob("*.png"))) >= 3  # 2 pictures (+ a reviewed one) and the sheet

    one = _show(config, with_people.image_id[:8], "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == sorted(
        ["contact_sheet.png", f"{with_people.image_id[:12]}.png", f"{with_people.image_id[:12]}.reviewed.png"])
    bad = _show(config, "xyz123")
    assert bad.returncode == 2 and "is not an image id" in bad.stderr
    missing = _show(config, "000000")
    assert missing.returncode == 2 and "no image in the store starts with 000000" in missing.stderr


def _bytes(tmp_path: Path, image_id: str) -> bytes:
    store = Store(tmp_path / "store")
    try:
        return store.image_bytes(image_id)
    finally:
        store.close()


def test_show_lists_an_image_whose_bytes_retention_removed(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", clock=lambda: 1_000.0)
    image_id, _ = store.ingest(b"\xff\xd8 auto", "test")
    store.claim("w")
    store.complete(image_id, "w", {"width": 8, "height": 8, "heads": [], "persons": []}, "b", "auto_accepted", 0.9,
                   [], audit=False)
    store.prune_auto_images(2_000.0)
    store.close()
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n')
    res = _show(config, "--out", str(tmp_path / "show"))
    assert res.returncode == 0, res.stderr
    assert image_id[:12] in res.stdout and "removed by retention" in res.stdout
    assert not (tmp_path / "show" / "contact_sheet.png").exists()
