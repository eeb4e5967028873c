"""The engine on a real ONNX pose model and real photos, checked against ultralytics itself."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from service.engine import Engine, select_providers
from service.errors import BundleError
from service.geometry import box_iou
from service.imageio import decode_image, read_image
from service.record import Prediction


@pytest.fixture(scope="module")
def engine(pose_bundle) -> Engine:
    return Engine(pose_bundle, batch_size=2)


@pytest.fixture(scope="module")
def photo_predictions(engine, coco_people_photos) -> list[Prediction]:
    return engine.predict([read_image(p) for p in coco_people_photos])


def _boxes(pred: Prediction) -> np.ndarray:
    return np.array([p.box for p in pred.persons], np.float32).reshape(-1, 4)


def _xy(pred: Prediction) -> np.ndarray:
    return np.array([[(k.x, k.y) for k in p.keypoints] for p in pred.persons], np.float32)


def test_agrees_with_ultralytics_within_one_pixel(pose_bundle, coco_people_photos, photo_predictions) -> None:
    pytest.importorskip("ultralytics", reason="compares with ultralytics' own predictions (train extra)")
    from ultralytics import YOLO

    model = YOLO(str(pose_bundle.model_path("pose_main")), task="pose")
    thr = pose_bundle.thresholds
    total = 0
    for path, ours in zip(coco_people_photos, photo_predictions):
        image = cv2.imread(str(path))
        ref = model.predict(image, imgsz=320, conf=thr.person_conf, iou=thr.nms_iou, rect=False,
                            device="cpu", verbose=False)[0]
        ref_boxes = ref.boxes.xyxy.numpy()
        ref_kpts = ref.keypoints.data.numpy()  # P, K, 3
        assert len(ours.persons) == len(ref_boxes), path.name
        if len(ref_boxes) == 0:
            continue
        match = box_iou(ref_boxes, _boxes(ours)).argmax(axis=1)
        assert sorted(match.tolist()) == list(range(len(ref_boxes))), f"{path.name}: not one-to-one"
        np.testing.assert_allclose(_boxes(ours)[match], ref_boxes, atol=1.0, err_msg=path.name)
        np.testing.assert_allclose(_xy(ours)[match], ref_kpts[..., :2], atol=1.0, err_msg=path.name)
        main_conf = np.array([[k.main_conf for k in p.keypoints] for p in ours.persons])[match]
        np.testing.assert_allclose(main_conf, ref_kpts[..., 2], atol=1e-3, err_msg=path.name)
        np.testing.assert_allclose([ours.persons[j].conf for j in match], ref.boxes.conf.numpy(), atol=1e-3)
        total += len(ref_boxes)
    assert total >= 3, "the photos should show several people"


def test_main_only_bundle_flags_and_heads(pose_bundle, photo_predictions) -> None:
    thr = pose_bundle.thresholds.main
    for pred in photo_predictions:
        for person in pred.persons:
            for k, kp in enumerate(person.keypoints):
                assert kp.visibility == ("visible" if kp.main_conf > thr[k] else "outside")
                assert kp.visible_conf == kp.main_conf
        # head_from_face: heads lie inside the image, at most one per person
        assert len(pred.heads) <= len(pred.persons)
        for h in pred.heads:
            assert 0 <= h.box[0] < h.box[2] <= pred.width and 0 <= h.box[1] < h.box[3] <= pred.height
    assert sum(len(p.heads) for p in photo_predictions) >= 2


def test_two_model_bundle_visibility(pose_two_model_bundle, coco_people_photos) -> None:
    # pose_visible is the same network, so every person matches itself: a point is visible
    # when its confidence > 0.9, occluded when in (0.5, 0.9], outside when <= 0.5.
    engine = Engine(pose_two_model_bundle)
    preds = engine.predict([read_image(p) for p in coco_people_photos[:3]])
    states = set()
    for pred in preds:
        for person in pred.persons:
            assert person.visible_match_conf == pytest.approx(person.conf)
            for kp in person.keypoints:
                assert kp.visible_conf == pytest.approx(kp.main_conf)
                expected = "visible" if kp.main_conf > 0.9 else "occluded" if kp.main_conf > 0.5 else "outside"
                assert kp.visibility == expected
                states.add(kp.visibility)
    assert states == {"visible", "occluded", "outside"}
    assert all(p.heads == () for p in preds)  # no head model, head_from_face off


def test_batching_does_not_change_results(engine, coco_people_photos, photo_predictions) -> None:
    one_by_one = [engine.predict([read_image(p)])[0] for p in coco_people_photos[:3]]
    for a, b in zip(one_by_one, photo_predictions[:3]):
        assert len(a.persons) == len(b.persons)
        np.testing.assert_allclose(_boxes(a), _boxes(b), atol=0.05)


def test_padded_batches_give_the_same_results(pose_bundle, coco_people_photos, photo_predictions) -> None:
    """On a GPU provider every run is padded to the run batch (one input shape per model); the
    padding rows must not leak into the results. Forced on here, on the CPU."""
    padded = Engine(pose_bundle, batch_size=4)
    assert not padded.pad_batches  # the CPU provider runs each batch as it comes
    padded.pad_batches = True
    seen = []
    for m in padded.models.values():  # record the batch shapes the sessions are given
        run = m.session.run
        m.session.run = lambda out, feed, run=run: (seen.append(next(iter(feed.values())).shape[0]), run(out, feed))[1]
    preds = padded.predict([read_image(p) for p in coco_people_photos[:3]])
    assert set(seen) == {4}
    for a, b in zip(preds, photo_predictions[:3]):
        assert len(a.persons) == len(b.persons) and len(a.heads) == len(b.heads)
        np.testing.assert_allclose(_boxes(a), _boxes(b), atol=0.05)


def test_empty_inputs(engine) -> None:
    assert engine.predict([]) == []
    blank = engine.predict_arrays([np.full((200, 300, 3), 114, np.uint8)])[0]
    assert (blank.width, blank.height, blank.persons, blank.heads) == (300, 200, (), ())


def _best_person_box(pred: Prediction) -> np.ndarray:
    return np.array(max(pred.persons, key=lambda p: p.conf).box)


def test_exif_orientation_gives_original_coordinates(engine, coco_people_photos, jpeg_with_orientation) -> None:
    upright = cv2.imread(str(coco_people_photos[1]))
    ref = engine.predict_arrays([upright])[0]
    stored = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)  # orientation 6 displays it upright
    data = jpeg_with_orientation(cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 97])[1].tobytes(), 6)
    pred = engine.predict([decode_image(data)])[0]
    assert (pred.width, pred.height) == (upright.shape[1], upright.shape[0])
    assert len(pred.persons) >= 1
    np.testing.assert_allclose(_best_person_box(pred), _best_person_box(ref), atol=4.0)


def test_grayscale_and_sixteen_bit_inputs(engine, coco_people_photos) -> None:
    color = cv2.imread(str(coco_people_photos[1]))
    gray = cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)
    as_gray_array = engine.predict_arrays([gray])[0]
    from_png = engine.predict([decode_image(cv2.imencode(".png", gray)[1].tobytes())])[0]
    from_png16 = engine.predict([decode_image(cv2.imencode(".png", gray.astype(np.uint16) << 8)[1].tobytes())])[0]
    assert (from_png16.width, from_png16.height) == (color.shape[1], color.shape[0])
    assert len(as_gray_array.persons) >= 1
    for other in (from_png, from_png16):
        assert len(other.persons) == len(as_gray_array.persons)
        np.testing.assert_allclose(_boxes(other), _boxes(as_gray_array), atol=1e-3)
    # a gray image of the scene finds the same main person as the color one
    ref = engine.predict_arrays([color])[0]
    iou = box_iou(_best_person_box(as_gray_array)[None], _best_person_box(ref)[None])[0, 0]
    assert iou > 0.8


def test_reduced_decode_maps_back_to_original_pixels(engine, coco_people_photos) -> None:
    photo = cv2.imread(str(coco_people_photos[1]))
    big = cv2.resize(photo, (photo.shape[1] * 4, photo.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    decoded = decode_image(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), max_side_hint=320)
    assert decoded.scale < 0.3 and (decoded.width, decoded.height) == (big.shape[1], big.shape[0])
    pred = engine.predict([decoded])[0]
    ref = engine.predict_arrays([photo])[0]
    iou = box_iou(_best_person_box(pred)[None], 4 * _best_person_box(ref)[None])[0, 0]
    assert iou > 0.85


def test_provider_selection() -> None:
    assert select_providers()[-1] == "CPUExecutionProvider"
    assert select_providers(["NoSuchProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="none of the execution providers"):
        select_providers(["NoSuchProvider"])


def test_session_options(engine) -> None:
    for m in engine.models.values():
        assert m.session.get_providers()[-1] == "CPUExecutionProvider"
    assert engine.models["pose_main"].size == (320, 320)
    assert engine.models["pose_main"].fixed_batch is None  # exported with a dynamic batch axis


def test_one_engine_serves_several_threads(engine, coco_people_photos, photo_predictions) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = [read_image(p) for p in coco_people_photos[:2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda im: engine.predict([im])[0], images * 2))
    for i, pred in enumerate(results):
        np.testing.assert_allclose(_boxes(pred), _boxes(photo_predictions[i % 2]), atol=0.05)


def test_a_gpu_provider_that_does_not_load_falls_back_with_a_warning(pose_bundle, monkeypatch, caplog) -> None:
    """What a box with onnxruntime-gpu but no CUDA libraries gets (simulated: the CPU build
    made to offer CUDA): the engine says which provider really runs, pads no batches, works."""
    import logging

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert select_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="service.engine"):
        eng = Engine(pose_bundle)
    assert eng.active_providers == ["CPUExecutionProvider"] and not eng.pad_batches
    assert "CUDAExecutionProvider was asked for but onnxruntime runs it on CPUExecutionProvider" in caplog.text
    assert len(eng.predict_arrays([np.zeros((64, 64, 3), np.uint8)])) == 1


def test_tensorrt_only_when_named(monkeypatch) -> None:
    """onnxruntime-gpu offers TensorRT whenever its provider library ships, also without TensorRT
    (measured on an H200 box: an error banner per session, then CUDA); the default order skips it."""
    import onnxruntime as ort

    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: everything)
    assert select_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(everything) == everything


def test_points_beyond_the_frame_are_outside_and_nan_confidences_count_as_none() -> None:
    """A person cut by the frame: the model places points beyond the edge with high confidence;
    clipped to the edge they came back visible or occluded there. A NaN confidence (an
    overflowing model) was scored as fully certain."""
    from service.bundle import load_bundle
    from service.postprocess import Detections

    demo = Engine(load_bundle(Path(__file__).parents[2] / "service" / "assets" / "demo_bundle"))
    k = demo.bundle.keypoints.count
    kpts = np.zeros((1, k, 3), np.float32)
    kpts[0, :, :2] = (50.0, 60.0)
    kpts[0, :, 2] = 0.99
    kpts[0, 1, 2] = np.nan
    off = np.zeros((1, k), bool)
    off[0, 0] = True  # clipped to the edge by decode_poses
    box, score = np.array([[10, 10, 120, 200]], np.float32), np.array([0.9], np.float32)
    main = Detections(box, score, np.zeros(1, np.int64), kpts, off)
    visible = Detections(box, score, np.zeros(1, np.int64), kpts.copy())
    calibrated, main_only = demo._persons(main, visible, 640, 480), demo._persons(main, None, 640, 480)
    for persons in (calibrated, main_only):
        kps = persons[0].keypoints
        assert kps[0].visibility == "outside" and kps[2].visibility == "visible"
        assert np.isfinite(kps[1].main_conf) and np.isfinite(kps[1].visible_conf)
    assert main_only[0].keypoints[1].visibility == "outside"  # no confidence: not there


def test_models_of_one_input_size_share_each_chunks_tensor(coco_people_photos, monkeypatch) -> None:
    """The three models of a bundle usually take one input size: each chunk's float tensor was
    built once per model (about a third of the engine's time outside onnxruntime). Built once
    now, with the same results, padded batches too."""
    import service.engine as engine_module
    from service.bundle import load_bundle

    bundle = load_bundle(Path(__file__).parents[2] / "service" / "assets" / "demo_bundle")
    images = [read_image(p) for p in coco_people_photos[:5]]

    class Unshared(Engine):  # each model builds its own tensors: what every model used to get
        def _run(self, m, arrays, tensors=None, *size_and_group):  # type: ignore[no-untyped-def]
            return super()._run(m, arrays, None, *size_and_group)

    reference = [p.to_json() for p in Unshared(bundle, batch_size=2).predict(images)]
    built: list[int] = []
    real = engine_module.to_tensor
    monkeypatch.setattr(engine_module, "to_tensor", lambda chunk: (built.append(len(chunk)), real(chunk))[1])
    engine = Engine(bundle, batch_size=2)
    sizes = {m.size for m in engine.models.values()}
    assert len(engine.models) == 3 and len(sizes) == 1
    preds = engine.predict(images)
    assert sum(built) == 5  # chunks of 2, 2 and 1, once for the three models
    _same_records([p.to_json() for p in preds], reference)
    unshared = Unshared(bundle, batch_size=2)
    unshared.pad_batches = engine.pad_batches = True  # every run padded to 2 rows
    reference = [p.to_json() for p in unshared.predict(images)]
    built.clear()
    _same_records([p.to_json() for p in engine.predict(images)], reference)
    assert sum(built) == 5


def _same_records(a: object, b: object) -> None:
    """Equal records; numbers within onnxruntime's run-to-run noise (identical inputs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_records(a[k], b[k])
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_records(x, y)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=0.02)
    else:
        assert a == b


def test_rect_letterbox_sizes() -> None:
    """ultralytics' rectangular inference: the image scaled into the model's size, the short side
    padded only up to a multiple of 32; a model whose ONNX fixes its height and width stays square."""
    from service.engine import _Model

    free = _Model("pose_main", None, "images", (320, 320), None, "pose", 1, (17, 3), dynamic_hw=True)  # type: ignore[arg-type]
    fixed = _Model("pose_main", None, "images", (320, 320), None, "pose", 1, (17, 3), dynamic_hw=False)  # type: ignore[arg-type]
    cases = {(480, 640): (256, 320), (640, 480): (320, 256), (720, 1280): (192, 320), (500, 500): (320, 320),
             (10, 1000): (32, 320), (3000, 4000): (256, 320), (100, 90): (320, 288)}
    for hw, net in cases.items():
        assert free.net_size(hw, "rect") == net, hw
        assert free.net_size(hw, "square") == fixed.net_size(hw, "rect") == (320, 320)


def test_rect_letterbox_runs_smaller_tensors_and_finds_the_same_people(coco_people_photos, monkeypatch) -> None:
    """"rect" feeds each image at its own aspect (mixed sizes in one call run as groups, results in
    the caller's order) and finds the same people as "square", boxes within a few pixels."""
    import service.engine as engine_module
    from service.bundle import load_bundle

    bundle = load_bundle(Path(__file__).parents[2] / "service" / "assets" / "demo_bundle")
    samples = sorted((Path(__file__).parents[2] / "service" / "assets" / "samples").glob("*.jpg"))[:4]
    landscape = [read_image(p) for p in samples]
    portrait = [decode_image(cv2.imencode(".png", cv2.rotate(im.pixels, cv2.ROTATE_90_CLOCKWISE))[1].tobytes())
                for im in landscape[:2]]
    images = [landscape[0], portrait[0], landscape[1], portrait[1], landscape[2], landscape[3]]
    square = Engine(bundle, batch_size=4).predict(images)
    shapes: list[tuple[int, ...]] = []
    real = engine_module.to_tensor
    monkeypatch.setattr(engine_module, "to_tensor", lambda chunk: (shapes.append(real(chunk).shape), real(chunk))[1])
    rect_engine = Engine(bundle, batch_size=4, letterbox="rect")
    rect = rect_engine.predict(images)
    assert sorted({s[2:] for s in shapes}) == [(256, 320), (320, 256)]
    assert sum(s[0] for s in shapes) == len(images)  # each chunk built once, shared by the three models
    alone = [rect_engine.predict([im])[0] for im in images]
    for a, b in zip(rect, alone):
        assert a.to_json() == b.to_json()
    rect_engine.pad_batches = True  # the GPU path: every run padded to batch_size rows
    for a, b in zip(rect_engine.predict(images), alone):
        _same_records(a.to_json(), b.to_json())
    found = 0
    for s, r in zip(square, rect):
        assert (s.width, s.height) == (r.width, r.height)
        for p in s.persons:
            if p.conf < 0.5:
                continue
            best = max((float(box_iou(np.array([p.box]), np.array([q.box]))[0, 0]) for q in r.persons), default=0.0)
            assert best > 0.85, (p.box, [q.box for q in r.persons])
            found += 1
    assert found >= 6
    with pytest.raises(ValueError, match="letterbox"):
        Engine(bundle, letterbox="stretch")
