"""Appearance novelty (service.novelty), its place in the bundle, the engine and the score."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from service.bundle import load_bundle, write_bundle
from service.engine import Engine
from service.errors import BundleError
from service.novelty import DIM, AppearanceProfile, descriptor
from service.record import Head, Prediction
from service.scoring import default_score, image_doubt, review_priority, score_components


def _daylight(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A colourful 'cabin' frame: coloured seat and window blocks at varying places, some noise."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(60, 200, 3)
    for _ in range(4):
        x, y = rng.integers(0, size - 30, 2)
        img[y:y + 30, x:x + 30] = rng.integers(0, 255, 3)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _ir(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """The same kind of frame as night IR: grey, dark, with a bright glow in the middle."""
    grey = _daylight(rng, size).mean(axis=2) * 0.35
    yy, xx = np.mgrid[:size, :size]
    grey += 120 * np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * (size / 4) ** 2))
    g = np.clip(grey, 0, 255).astype(np.uint8)
    return np.stack([g, g, g], axis=2)


@pytest.fixture(scope="module")
def profile() -> AppearanceProfile:
    rng = np.random.default_rng(0)
    return AppearanceProfile.fit([descriptor(_daylight(rng)) for _ in range(60)])


def test_descriptor_shape_and_inputs() -> None:
    rng = np.random.default_rng(1)
    img = _daylight(rng)
    d = descriptor(img)
    assert d.shape == (DIM,) and d.dtype == np.float32 and np.all(np.isfinite(d))
    assert np.array_equal(d, descriptor(img.copy()))
    grey = descriptor(img.mean(axis=2).astype(np.uint8))  # HxW grey input works, and reads as grey
    assert grey[-1] == 1.0 and d[-1] < 0.5


def test_novel_images_stand_out(profile: AppearanceProfile) -> None:
    rng = np.random.default_rng(2)
    familiar = profile.novelty_many(np.stack([descriptor(_daylight(rng)) for _ in range(40)]))
    novel = profile.novelty_many(np.stack([descriptor(_ir(rng)) for _ in range(40)]))
    assert familiar.max() < 1.0  # like the training images: no doubt from novelty
    assert np.median(novel) > 1.5 and novel.min() > 1.4  # grey night frames: (nearly) full doubt
    x = descriptor(_ir(rng))
    assert profile.novelty(x) == pytest.approx(float(profile.novelty_many(x[None])[0]))


def test_profile_json_round_trip_and_errors(profile: AppearanceProfile) -> None:
    data = json.loads(json.dumps(profile.to_json()))
    again = AppearanceProfile.from_json(data)
    x = descriptor(_ir(np.random.default_rng(3)))
    assert again.novelty(x) == pytest.approx(profile.novelty(x), rel=1e-3)
    assert again.images == 60
    with pytest.raises(ValueError, match="version"):
        AppearanceProfile.from_json({**data, "version": 99})
    with pytest.raises(ValueError, match="references"):
        AppearanceProfile.from_json({**data, "references": [[0.0] * 5]})
    with pytest.raises(ValueError, match="positive"):
        AppearanceProfile.from_json({**data, "typical": 0})
    with pytest.raises(ValueError, match="at least 2"):
        AppearanceProfile.fit([x])
    many = AppearanceProfile.fit(np.random.default_rng(4).normal(size=(600, DIM)))
    assert len(many.references) == 256 and many.images == 600


def test_training_profile_samples_a_large_dataset(tmp_path, monkeypatch) -> None:
    """``exporter.train.appearance_profile`` reads at most ``PROFILE_SAMPLE`` images (seeded),
    skips unreadable ones, and gives None with fewer than 2 readable ones."""
    import cv2

    import exporter.train as train
    import service.imageio as imageio

    rng = np.random.default_rng(8)
    paths = []
    for i in range(12):
        p = tmp_path / f"f{i:02d}.png"
        cv2.imwrite(str(p), _daylight(rng, 64))
        paths.append(p)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    full = train.appearance_profile([*paths, tmp_path / "bad.jpg"], seed=1)
    assert full is not None and full.images == 12
    read: list = []
    orig = imageio.read_image
    monkeypatch.setattr(imageio, "read_image", lambda p, *a, **k: (read.append(p), orig(p, *a, **k))[1])
    monkeypatch.setattr(train, "PROFILE_SAMPLE", 5)
    sampled = train.appearance_profile(paths, seed=1)
    assert sampled is not None and sampled.images == 5 and len(read) == 5
    assert read == sorted(read, key=paths.index)  # in dataset order, the same sample for the same seed
    first = list(read)
    read.clear()
    again = train.appearance_profile(paths, seed=1)
    assert read == first and again is not None and np.array_equal(again.references, sampled.references)
    assert train.appearance_profile([paths[0], tmp_path / "bad.jpg"]) is None


def test_bundle_carries_the_profile(pose_bundle, profile, tmp_path) -> None:
    import shutil

    rng = np.random.default_rng(5)
    frames = [_daylight(rng, 160), _ir(rng, 160)]
    dst = tmp_path / "b"
    shutil.copytree(pose_bundle.path, dst)
    b = dataclasses.replace(load_bundle(dst), appearance=profile)
    write_bundle(b)
    loaded = load_bundle(dst)
    assert loaded.appearance is not None and loaded.appearance.images == 60
    preds = Engine(loaded).predict_arrays(frames)
    assert all(p.novelty is not None and p.novelty > 0 for p in preds)
    assert preds[0].novelty < 1.0 < 1.4 < preds[1].novelty  # the daylight frame is familiar, the IR one not
    assert Prediction.from_json(json.loads(json.dumps(preds[1].to_json()))).novelty == pytest.approx(preds[1].novelty, abs=1e-4)
    assert Engine(pose_bundle).predict_arrays(frames[:1])[0].novelty is None
    data = json.loads((dst / "bundle.json").read_text())
    data["appearance"]["scale"] = [0.0] * DIM
    (dst / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="appearance"):
        load_bundle(dst)


def test_novelty_in_the_score(pose_bundle) -> None:
    head = Head((10.0, 10.0, 30.0, 30.0), 0.95)
    familiar = Prediction(100, 100, heads=(head,), novelty=0.8)
    novel = Prediction(100, 100, heads=(head,), novelty=1.6)
    plain = Prediction(100, 100, heads=(head,))
    assert "novel_appearance" not in score_components(plain, pose_bundle)
    assert score_components(familiar, pose_bundle)["novel_appearance"] == 1.0
    score, reasons = default_score(novel, pose_bundle)
    assert score == 0.0 and reasons[0] == "novel_appearance"
    assert default_score(familiar, pose_bundle)[0] == default_score(plain, pose_bundle)[0]
    assert review_priority(novel, pose_bundle) > review_priority(familiar, pose_bundle)
    assert image_doubt(novel, pose_bundle) > image_doubt(familiar, pose_bundle)
    empty_novel = Prediction(100, 100, novelty=2.0)
    assert set(score_components(empty_novel, pose_bundle)) == {"empty", "novel_appearance"}
    assert review_priority(empty_novel, pose_bundle) == 1.0
