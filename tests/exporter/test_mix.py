"""The training mix: origins, deterministic repeat counts, and their effect on the label sets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.labelsets import derive_label_sets
from exporter.mix import TrainingMix, dataset_version_of, image_origins, repeat_count, training_repeats


def coco(n_reviewed: int, n_auto: int) -> dict[str, Any]:
    """A COCO dict shaped like ``annotator dataset export``'s: image origin + annotation provenance."""
    kpt_names = [f"p{i}" for i in range(17)]
    images, anns = [], []
    for i in range(n_reviewed + n_auto):
        origin = "reviewed" if i < n_reviewed else "auto"
        images.append({"id": i + 1, "file_name": f"img{i:03d}.jpg", "width": 64, "height": 48,
                       "sha256": f"{i:064x}", "origin": origin})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 30], "iscrowd": 0,
                     "keypoints": [10, 10, 2] * 17, "num_keypoints": 17,
                     "provenance": {"origin": "human" if origin == "reviewed" else "auto"}})
    return {"info": {"dataset_version": "abc123"}, "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": kpt_names, "skeleton": []},
                           {"id": 2, "name": "head"}]}


def write_dataset(root: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """``data`` as ``root/annotations.json`` with placeholder image files; (annotations, images dir)."""
    images = root / "images"
    images.mkdir()
    for im in data["images"]:
        (images / im["file_name"]).write_bytes(b"\xff\xd8fake")
    ann = root / "annotations.json"
    ann.write_text(json.dumps(data))
    return ann, images


@pytest.mark.parametrize("weight, expected", [(0.0, 0), (1.0, 1), (2.0, 2), (3.0, 3)])
def test_whole_weights_repeat_exactly(weight: float, expected: int) -> None:
    assert all(repeat_count(weight, f"img{i}") == expected for i in range(50))


@pytest.mark.parametrize("weight", [0.25, 0.5, 1.5])
def test_fractional_weights_are_unbiased_and_deterministic(weight: float) -> None:
    counts = [repeat_count(weight, f"img{i}", seed=3) for i in range(4000)]
    assert sum(counts) / len(counts) == pytest.approx(weight, abs=0.03)
    assert counts == [repeat_count(weight, f"img{i}", seed=3) for i in range(4000)]
    assert counts != [repeat_count(weight, f"img{i}", seed=4) for i in range(4000)]


def test_origins_from_image_field_provenance_or_default() -> None:
    data = coco(2, 2)
    assert list(image_origins(data).values()) == ["reviewed", "reviewed", "auto", "auto"]
    for im in data["images"]:
        del im["origin"]  # fall back to the annotations' provenance
    assert list(image_origins(data).values()) == ["reviewed", "reviewed", "auto", "auto"]
    plain = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}  # e.g. annotator synth
    assert image_origins(plain) == {1: "reviewed"}
    assert image_origins({"images": [], "annotations": []}) == {}


def test_training_repeats_summary_and_reviewed_only() -> None:
    data = coco(3, 5)
    repeats, summary = training_repeats(data, TrainingMix(reviewed_only=True))
    assert [repeats[i] for i in range(1, 9)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert summary["images"] == {"reviewed": 3, "auto": 5} and summary["auto_weight"] == 0.0
    repeats, summary = training_repeats(data, TrainingMix(auto_weight=2.0))
    assert summary["training_copies_before_split"] == {"reviewed": 3, "auto": 10}
    with pytest.raises(ValueError, match="auto_weight"):
        TrainingMix(auto_weight=-0.5)
    assert dataset_version_of(data, "sha256:x") == "abc123"
    assert dataset_version_of({"images": []}, "sha256:x") == "sha256:x"


def test_label_sets_repeat_training_images_only(tmp_path: Path) -> None:
    data = coco(4, 6)
    ann, images = write_dataset(tmp_path, data)
    repeats, _ = training_repeats(data, TrainingMix(auto_weight=2.0))
    sets = derive_label_sets(ann, images, tmp_path / "sets", val_fraction=0.2, seed=0, repeats=repeats)
    train = sorted(p.name for p in (sets.root / "pose_main" / "images" / "train").iterdir())
    val = sorted(p.name for p in (sets.root / "pose_main" / "images" / "val").iterdir())
    assert 1 <= len(val) <= 5 and not any("__r" in v for v in val)
    stems = {v.rsplit(".", 1)[0] for v in val}
    assert not any(t.split("__r")[0].rsplit(".", 1)[0] in stems for t in train)  # no copy of a val image
    assert sets.train_images == len(train) == sum(repeats[i] for i in range(1, 11)) - sum(
        repeats[int(s[3:]) + 1] for s in stems)
    labels = sets.root / "pose_main" / "labels" / "train"
    assert sorted(p.stem for p in labels.iterdir()) == sorted(t.rsplit(".", 1)[0] for t in train)
    only = derive_label_sets(ann, images, tmp_path / "only", 0.25, 0,
                             repeats=training_repeats(data, TrainingMix(reviewed_only=True))[0])
    assert only.train_images + only.val_images == 4
    with pytest.raises(ValueError, match="no image left"):
        derive_label_sets(ann, images, tmp_path / "none", 0.25, 0, repeats={i: 0 for i in range(1, 11)})


def test_validation_split_is_drawn_from_reviewed_images(tmp_path: Path) -> None:
    """Checkpoint choice and threshold calibration read the validation split: with auto labels
    in the mix it holds reviewed images only (about a tenth of them), and every auto image trains."""
    data = coco(20, 30)
    ann, images = write_dataset(tmp_path, data)
    repeats, _ = training_repeats(data, TrainingMix(auto_weight=1.0))
    reviewed = {im["id"] for im in data["images"] if im["origin"] == "reviewed"}
    for seed in range(5):
        sets = derive_label_sets(ann, images, tmp_path / f"s{seed}", 0.1, seed, repeats=repeats, val_from=reviewed)
        val = {int(p.stem[3:]) + 1 for p in (sets.root / "pose_main" / "images" / "val").iterdir()}
        train = {int(p.stem[3:]) + 1 for p in (sets.root / "pose_main" / "images" / "train").iterdir()}
        assert 1 <= len(val) <= 6 and val <= reviewed and not val & train and train | val == set(range(1, 51))
    # Without reviewed images to spare, the split falls back to all images.
    few = derive_label_sets(ann, images, tmp_path / "few", 0.1, 0, repeats=repeats, val_from={1})
    assert 1 <= few.val_images <= 12 and not {int(i) for i in few.val_ids} <= reviewed
    # All reviewed: the split is the one of a plain dataset (same images, same seed).
    plain = derive_label_sets(ann, images, tmp_path / "plain", 0.1, 3)
    same = derive_label_sets(ann, images, tmp_path / "same", 0.1, 3, val_from=set(range(1, 51)))
    listing = [sorted(p.name for p in (s.root / "pose_main" / "images" / "val").iterdir()) for s in (plain, same)]
    assert listing[0] == listing[1]


def test_propagated_images_have_their_own_weight() -> None:
    """Auto images that took a reviewed frame's label (provenance ``propagated_from``, as
    ``annotator dataset export --propagate`` writes it) train at ``propagated_weight``."""
    data = coco(2, 4)
    for a in data["annotations"][2:4]:  # images 3 and 4 took image 1's label
        a["provenance"] = {"origin": "auto", "propagated_from": "img000", "propagation_distance": 3}
    repeats, summary = training_repeats(data, TrainingMix(auto_weight=0.0, propagated_weight=2.0))
    assert [repeats[i] for i in range(1, 7)] == [1, 1, 2, 2, 0, 0]
    assert summary["images"] == {"reviewed": 2, "auto": 4, "propagated": 2}
    assert summary["training_copies_before_split"] == {"reviewed": 2, "auto": 4, "propagated": 4}
    default, _ = training_repeats(data, TrainingMix(auto_weight=0.0))  # default: as a reviewed image
    assert [default[i] for i in range(1, 7)] == [1, 1, 1, 1, 0, 0]
    same, summary = training_repeats(data, TrainingMix(auto_weight=0.0, propagated_weight=None))  # as the auto ones
    assert [same[i] for i in range(1, 7)] == [1, 1, 0, 0, 0, 0] and summary["propagated_weight"] == 0.0
    _, plain = training_repeats(coco(2, 4), TrainingMix())  # nothing propagated: the summary as before
    assert "propagated" not in plain["images"]
    off, _ = training_repeats(data, TrainingMix(reviewed_only=True, propagated_weight=2.0))
    assert [off[i] for i in range(1, 7)] == [1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="propagated_weight"):
        TrainingMix(propagated_weight=11.0)


@pytest.mark.parametrize("by", ["sha256", "file_name"])
def test_propagated_copies_of_validation_images_neither_train_nor_validate(tmp_path: Path, by: str) -> None:
    """The validation split is drawn per reviewed image; an auto image that took a validation
    image's label (``propagated_from``: its sha256 in an export, its file name in the
    benchmark's sets) would train on that label, so it is left out; the other copies train."""
    data = coco(10, 25)
    source = {}
    for a in data["annotations"][10:30]:  # auto images 11..30 took reviewed image 1..10's label; 31..35 did not
        src = data["images"][(a["image_id"] - 11) % 10]
        a["provenance"] = {"origin": "auto", "propagated_from": src[by], "propagation_distance": 2}
        source[a["image_id"]] = src["id"]
    ann, images = write_dataset(tmp_path, data)
    repeats, _ = training_repeats(data, TrainingMix())
    reviewed = set(range(1, 11))
    for seed in range(3):
        sets = derive_label_sets(ann, images, tmp_path / f"s{seed}", 0.2, seed, repeats=repeats, val_from=reviewed)
        val = {int(p.stem[3:]) + 1 for p in (sets.root / "pose_main" / "images" / "val").iterdir()}
        train = {int(p.stem[3:]) + 1 for p in (sets.root / "pose_main" / "images" / "train").iterdir()}
        left_out = {i for i, s in source.items() if s in val}
        assert val and val <= reviewed and len(left_out) == 2 * len(val)
        assert not train & (val | left_out) and train == set(range(1, 36)) - val - left_out
        assert sets.propagated_from_val == len(left_out) and sets.train_images == len(train)
    from exporter.mix import propagation_sources

    assert propagation_sources(data) == {i: {s} for i, s in source.items()}
