"""Synthetic cabin scenes: determinism, ground-truth semantics, knobs."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from exporter.synth import HEAD_CATEGORY, PERSON_CATEGORY, generate
from exporter.synth.people import IDX, OWNER_PARTS, P_FARM_L, P_HEAD, P_TORSO, make_occupant
from exporter.synth.render import Knobs
from exporter.synth.scene import CANVAS_H, CANVAS_W, OBJ_SEAT, canvas_visibility
from service.keypoints import CABIN19


def _load(d: Path) -> dict:
    return json.loads((d / "annotations.json").read_text())


def test_same_seed_same_images_and_labels(tmp_path: Path) -> None:
    a, b = generate(tmp_path / "a", 6, seed=7), generate(tmp_path / "b", 6, seed=7)
    assert _load(a)["annotations"] == _load(b)["annotations"]
    for im in _load(a)["images"]:
        assert (a / "images" / im["file_name"]).read_bytes() == (b / "images" / im["file_name"]).read_bytes()
    c = generate(tmp_path / "c", 6, seed=8)
    assert _load(c)["annotations"] != _load(a)["annotations"]


def test_subset_is_reproducible_by_index(tmp_path: Path) -> None:
    whole = _load(generate(tmp_path / "w", 5, seed=3))
    tail = _load(generate(tmp_path / "t", 2, seed=3, start=3))
    strip = lambda anns: [{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in anns]  # noqa: E731
    assert strip([a for a in whole["annotations"] if a["image_id"] in (4, 5)]) == strip(tail["annotations"])


def test_coco_structure_and_visibility_flags(tmp_path: Path) -> None:
    d = generate(tmp_path / "d", 20, seed=11)
    coco = _load(d)
    cats = {c["id"]: c for c in coco["categories"]}
    assert cats[PERSON_CATEGORY]["keypoints"] == list(CABIN19.names)
    assert cats[HEAD_CATEGORY]["name"] == "head"
    flags = []
    for a in coco["annotations"]:
        if a["category_id"] != PERSON_CATEGORY:
            continue
        kp = np.array(a["keypoints"], float).reshape(-1, 3)
        assert kp.shape == (19, 3)
        assert set(np.unique(kp[:, 2])) <= {0, 1, 2}
        out = kp[kp[:, 2] == 0]
        assert np.all(out[:, :2] == 0), "outside points must be written as 0, 0"
        inside = kp[kp[:, 2] > 0]
        assert np.all((inside[:, 0] >= 0) & (inside[:, 0] < 640) & (inside[:, 1] >= 0) & (inside[:, 1] < 480))
        assert a["num_keypoints"] == int((kp[:, 2] > 0).sum())
        flags.extend(kp[:, 2].tolist())
    counts = np.bincount(np.array(flags, int), minlength=3)
    # All three states occur in a modest sample: occlusion and leaving the frame are common in cabins.
    assert counts.min() > 20, counts
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    api = COCO(str(d / "annotations.json"))
    assert len(api.getImgIds()) == 20


def test_visibility_comes_from_the_id_buffer() -> None:
    rng = np.random.default_rng(0)
    o = make_occupant(rng, "driver", (360.0, 200.0), 1.0, False, None, False)
    o.self_occluded = set()
    ids = np.full((CANVAS_H, CANVAS_W), OBJ_SEAT, np.int32)
    sid = 1
    owners = {k: OWNER_PARTS[n][0] for k, n in enumerate(CABIN19.names)}
    for k, (x, y) in enumerate(o.points):
        xi, yi = int(round(x)), int(round(y))
        if 1 <= xi < CANVAS_W - 1 and 1 <= yi < CANVAS_H - 1:
            ids[yi - 1:yi + 2, xi - 1:xi + 2] = sid * 32 + owners[k]
    nose = IDX["nose"]
    wrist = IDX["left_wrist"]
    # Cover the left wrist with the torso (own body) and the nose with a seat.
    x, y = np.round(o.points[wrist]).astype(int)
    ids[y - 1:y + 2, x - 1:x + 2] = sid * 32 + P_TORSO
    x, y = np.round(o.points[nose]).astype(int)
    ids[y - 1:y + 2, x - 1:x + 2] = OBJ_SEAT
    o.self_occluded = {IDX["right_ear"]}
    flags = canvas_visibility(ids, o, sid)
    assert flags[wrist] == 1 and flags[nose] == 1 and flags[IDX["right_ear"]] == 1
    assert flags[IDX["left_eye"]] == 2
    assert P_HEAD in OWNER_PARTS["left_eye"] and P_FARM_L in OWNER_PARTS["left_wrist"]


@pytest.mark.parametrize("knobs,check", [
    (Knobs(ir=1.0), "ir"),
    (Knobs(crowded=1.0, ir=0.0), "crowded"),
    (Knobs(cameras=(("overhead", 1.0),)), "overhead"),
    (Knobs(cameras=(("roof", 1.0),)), "roof"),
])
def test_knobs_shift_the_population(tmp_path: Path, knobs: Knobs, check: str) -> None:
    d = generate(tmp_path / check, 6, seed=5, knobs=knobs)
    coco = _load(d)
    for im in coco["images"]:
        tags = im["tags"]
        if check == "ir":
            assert tags["ir"]
            img = cv2.imread(str(d / "images" / im["file_name"]), cv2.IMREAD_UNCHANGED)
            assert img.ndim == 2, "IR images are single-channel"
        elif check == "crowded":
            assert tags["crowded"]
        else:
            assert tags["camera"] == check
    if check == "crowded":
        slots = [a["attributes"]["slot"] for a in coco["annotations"] if a["category_id"] == PERSON_CATEGORY]
        assert sum(s.startswith("rear") for s in slots) >= 3 * len(coco["images"]) - 3


def test_roof_camera_tilts_people(tmp_path: Path) -> None:
    """The roof camera's roll (30-60 degrees) tilts the body axis (neck to mid-hip); the usual
    cameras keep people about upright."""
    def tilts(camera: str) -> list[float]:
        coco = _load(generate(tmp_path / camera, 16, seed=3, knobs=Knobs(ir=0.0, cameras=((camera, 1.0),))))
        out = []
        for a in coco["annotations"]:
            if a["category_id"] != PERSON_CATEGORY:
                continue
            kp = np.array(a["keypoints"], float).reshape(-1, 3)
            neck, hips = kp[IDX["neck"]], kp[[IDX["left_hip"], IDX["right_hip"]]]
            if neck[2] > 0 and (hips[:, 2] > 0).all():
                d = hips[:, :2].mean(0) - neck[:2]
                out.append(float(np.degrees(np.arctan2(abs(d[0]), abs(d[1])))))
        assert len(out) >= 5
        return out

    roof, mirror = tilts("roof"), tilts("mirror")
    print(f"body axis tilt from vertical, median: roof {np.median(roof):.0f}, mirror {np.median(mirror):.0f} deg")
    assert np.median(roof) >= 25 and np.median(mirror) <= 15


def test_person_area_is_amodal_and_the_visible_area_is_kept(tmp_path: Path) -> None:
    """``area`` (the OKS scale) is what the person would cover with nothing in front; the modal
    segment is kept as ``attributes.visible_area``; a hidden rear passenger's differ most."""
    coco = _load(generate(tmp_path / "d", 30, seed=5, knobs=Knobs(crowded=1.0)))
    persons = [a for a in coco["annotations"] if a["category_id"] == PERSON_CATEGORY]
    ratios = {}
    for a in persons:
        va = a["attributes"]["visible_area"]
        assert 0 <= va <= a["area"] + 1e-6
        ratios.setdefault(a["attributes"]["slot"].split("_")[0], []).append(a["area"] / max(va, 1.0))
    # Rear occupants sit behind the front seats and each other; the front row is mostly in view.
    assert np.median(ratios["rear"]) > 1.5 * np.median(ratios["driver"] + ratios["passenger"])
    assert max(ratios["rear"]) > 3.0


def test_capture_sequences_move_the_scene_a_little(tmp_path: Path) -> None:
    single, seq = generate(tmp_path / "s", 2, seed=5), generate(tmp_path / "q", 8, seed=5, frames=4)
    one, many = _load(single), _load(seq)
    # Frame 0 of scene k is image k of the plain set: byte for byte.
    for k in (0, 1):
        assert (single / "images" / one["images"][k]["file_name"]).read_bytes() == \
            (seq / "images" / many["images"][4 * k]["file_name"]).read_bytes()
    persons: dict[int, list[np.ndarray]] = {}
    for a in many["annotations"]:
        if a["category_id"] == PERSON_CATEGORY:
            persons.setdefault(a["image_id"], []).append(np.array(a["keypoints"], float).reshape(-1, 3))
    for scene in (0, 1):
        ims = [im for im in many["images"] if im["tags"]["scene"] == scene]
        assert [im["tags"]["frame"] for im in ims] == [0, 1, 2, 3]
        first = ims[0]
        for im in ims[1:]:
            # Same scene: same camera, light, seats taken; the people moved a little, not nothing.
            assert {k: v for k, v in im["tags"].items() if k != "frame"} == \
                {k: v for k, v in first["tags"].items() if k != "frame"}
            a, b = persons.get(first["id"], []), persons.get(im["id"], [])
            assert len(a) == len(b)
            for pa, pb in zip(a, b):
                both = (pa[:, 2] > 0) & (pb[:, 2] > 0)
                moved = np.abs(pa[both, :2] - pb[both, :2]).mean()
                assert 0 < moved < 40, moved
            pixels = [cv2.imread(str(seq / "images" / x["file_name"])).astype(float) for x in (first, im)]
            assert np.abs(pixels[0] - pixels[1]).mean() > 0.5  # fresh sensor noise at the least
    with pytest.raises(ValueError, match="frames"):
        generate(tmp_path / "bad", 2, seed=5, frames=0)


def test_varied_capture_sequences_are_uneven_recordings(tmp_path: Path) -> None:
    from exporter.synth.sequence import scene_frame, varied_lengths

    lengths = varied_lengths(800, 10, seed=3)
    assert sum(lengths) == 800 and min(lengths) >= 1 and max(lengths) <= 40
    assert lengths == varied_lengths(800, 10, seed=3) != varied_lengths(800, 10, seed=4)
    assert 60 <= len(lengths) <= 100  # about 800 / 10.6 scenes
    by_size = sorted(lengths, reverse=True)
    # A few long recordings hold most frames; most scenes are short.
    assert sum(by_size[: len(lengths) // 4]) > 0.5 * 800
    assert np.median(lengths) < 10
    assert [scene_frame(i, [2, 1, 3]) for i in range(6)] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    with pytest.raises(ValueError, match="past"):
        scene_frame(6, [2, 1, 3])
    with pytest.raises(ValueError):
        varied_lengths(0, 10, seed=3)
    # Rendered: image i is frame f of scene s as the lengths say; frame 0 of a scene is that
    # scene's own image whatever the lengths (the same draws as a fixed-length sequence's frame 0).
    seq = generate(tmp_path / "v", 6, seed=5, lengths=[2, 1, 3])
    fixed = generate(tmp_path / "f", 6, seed=5, frames=2)
    ims, ref = _load(seq)["images"], _load(fixed)["images"]
    assert [(im["tags"]["scene"], im["tags"]["frame"]) for im in ims] == [scene_frame(i, [2, 1, 3]) for i in range(6)]
    assert _load(seq)["info"]["lengths"] == [2, 1, 3]
    # scene 1 starts at image 2 here and at image 2 in the 2-frame set too
    assert (seq / "images" / ims[2]["file_name"]).read_bytes() == (fixed / "images" / ref[2]["file_name"]).read_bytes()
    assert {k: v for k, v in ims[4]["tags"].items() if k != "frame"} == \
        {k: v for k, v in ims[3]["tags"].items() if k != "frame"}  # same scene 2, another frame
    with pytest.raises(ValueError, match="cover"):
        generate(tmp_path / "bad", 6, seed=5, lengths=[2, 1])
