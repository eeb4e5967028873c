"""Labels land where the person is, whatever form the image comes in (equivariance).

The demo bundle annotates a shipped sample; variants that must give the network the very same
tensor (EXIF orientations 2..8 of lossless PNGs, a nearest-neighbour 2x copy, 16-bit / gray +
alpha / palette encodings) must give the same boxes and key points once mapped back, to float
precision: any difference there is geometry, not model noise. A model-free round trip checks
the letterbox and reduced-decode mapping on odd, panoramic and tall sizes; the drawing puts a
point's mark on the pixel that holds it.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from service.draw import CENTRE_COLOUR, draw_prediction
from service.geometry import letterbox, points_to_original
from service.imageio import decode_image
from service.keypoints import KeypointSchema
from service.record import Keypoint, Person, Prediction

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "service" / "assets" / "samples" / "cabin_2026_000000.jpg"  # an IR (gray) frame, two occupants
T = Image.Transpose
# The stored pixels of an upright image that carries orientation o (the decoder applies o).
STORED = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
          7: T.TRANSVERSE, 8: T.ROTATE_270}


def _png(image: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif.tobytes())
    return buf.getvalue()


def _coords(pred: Prediction) -> np.ndarray:
    """Every person box corner, key point and head box corner, in order, as [N, 2]."""
    out: list[tuple[float, float]] = []
    for p in pred.persons:
        out += [p.box[:2], p.box[2:]] + [(k.x, k.y) for k in p.keypoints]
    for h in pred.heads:
        out += [h.box[:2], h.box[2:]]
    return np.array(out, np.float64).reshape(-1, 2)


@pytest.fixture(scope="module")
def engine():
    from service.bundle import load_bundle
    from service.cli_daemon import DEMO_BUNDLE
    from service.engine import Engine

    return Engine(load_bundle(DEMO_BUNDLE), providers=["CPUExecutionProvider"])


def test_exact_variants_annotate_identically(engine) -> None:
    pixels = decode_image(SAMPLE.read_bytes()).pixels
    gray = pixels[..., 0]
    assert (pixels == gray[..., None]).all(), "the sample is an IR frame (gray)"
    upright = Image.fromarray(gray, "L")
    hint = max(max(m.size) for m in engine.models.values())  # as the daemon decodes

    def annotate(data: bytes) -> Prediction:
        return engine.predict([decode_image(data, max_side_hint=hint)])[0]

    ref = annotate(_png(upright))
    assert ref.persons and ref.heads
    variants = {f"EXIF orientation {o}": (_png(upright.transpose(STORED[o]), o), 1.0) for o in STORED}
    variants["2x nearest"] = (_png(upright.resize((upright.width * 2, upright.height * 2), Image.NEAREST)), 0.5)
    variants["16-bit"] = (cv2.imencode(".png", gray.astype(np.uint16) << 8)[1].tobytes(), 1.0)
    variants["12-bit in 16"] = (cv2.imencode(".png", gray.astype(np.uint16) << 4)[1].tobytes(), 1.0)
    variants["gray + alpha"] = (_png(Image.fromarray(np.dstack([gray, np.full_like(gray, 200)]), "LA")), 1.0)
    variants["palette"] = (_png(upright.convert("P")), 1.0)
    for name, (data, back) in variants.items():
        pred = annotate(data)
        got = _coords(pred) * back
        assert got.shape == _coords(ref).shape, f"{name}: other persons/heads than the original"
        assert np.abs(got - _coords(ref)).max() < 1e-3, f"{name}: labels moved against the original"
        assert [k.visibility for p in pred.persons for k in p.keypoints] == \
               [k.visibility for p in ref.persons for k in p.keypoints], f"{name}: visibility changed"


@pytest.mark.parametrize("size", [(640, 480), (1279, 961), (3840, 1080), (480, 1440), (2560, 1920)])
@pytest.mark.parametrize("orientation", [1, 6, 7])
@pytest.mark.parametrize("net", [(320, 320), (96, 320)])
def test_letterbox_round_trip_lands_on_the_dot(size: tuple[int, int], orientation: int,
                                               net: tuple[int, int]) -> None:
    """A bright blob painted in the upright image, stored turned (JPEG: 2560x1920 is decoded
    at 1/8 or 1/4), found in the network input and mapped back: no systematic offset beyond a
    fiftieth of a network pixel + 0.1 px (a half-pixel or axis error is beyond that)."""
    w, h = size
    # A smooth blob (sigma 2 network pixels): its centroid survives INTER_LINEAR's sampling of a
    # 10x reduction, where a sharp square's would move by aliasing, not by geometry.
    truth = np.array([w * 0.3 + 0.37, h * 0.6 + 0.81])
    sigma = 2 / min(net[0] / h, net[1] / w)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel i's centre is at i + 0.5
    upright = (255 * np.exp(-((xx - truth[0]) ** 2 + (yy - truth[1]) ** 2) / (2 * sigma ** 2))).astype(np.uint8)
    stored = Image.fromarray(upright, "L")
    if orientation != 1:
        stored = stored.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=98, exif=exif.tobytes())
    im = decode_image(buf.getvalue(), max_side_hint=320)
    assert (im.width, im.height) == (w, h)
    boxed, lb = letterbox(im.pixels, net)
    weight = np.zeros(boxed.shape[:2])  # the content only (the padding is grey, the background black)
    top, left = int(lb.pad_y), int(lb.pad_x)
    content = im.pixels.shape[0] * lb.gain_y, im.pixels.shape[1] * lb.gain_x
    rows, cols = slice(top, top + round(content[0])), slice(left, left + round(content[1]))
    weight[rows, cols] = boxed[rows, cols, 0]
    ys, xs = np.nonzero(weight)
    centre = np.array([(xs + 0.5) @ weight[ys, xs], (ys + 0.5) @ weight[ys, xs]]) / weight[ys, xs].sum()
    back = points_to_original(centre[None].astype(np.float32), lb, im.scale_xy)[0]
    per_net_px = np.array([1 / (lb.gain_x * im.scale_xy[0]), 1 / (lb.gain_y * im.scale_xy[1])])
    # Measured: at most 0.005 network pixels on every case here; a half-pixel offset in the
    # original (or decoded) frame, or a turned axis, is far beyond 0.02 network px + 0.1 px.
    assert (np.abs(back - truth) <= 0.02 * per_net_px + 0.1).all(), (back, truth, per_net_px)


@pytest.mark.parametrize("scale", [1, 2])
def test_drawn_mark_is_centred_on_the_pixel_that_holds_the_point(scale: int) -> None:
    """Coordinates are continuous (pixel i spans [i, i + 1)): a point at 40.9 is in pixel 40;
    rounding drew its mark on pixel 41, every mark half a pixel right of and below its point
    on average (a whole pixel of ``annotator show``'s 1/2 decode of a large image)."""
    schema = KeypointSchema(("nose",), (0.03,), ())
    rng = np.random.default_rng(3)
    errors = []
    for x, y in rng.uniform(20, 180, (40, 2)):
        pred = Prediction(200 * scale, 200 * scale, persons=(Person(
            (0.0, 0.0, 200.0 * scale, 200.0 * scale), 0.9,
            (Keypoint(float(x) * scale, float(y) * scale, 0.9, 0.9, "visible"),)),))
        out = draw_prediction(np.zeros((200, 200, 3), np.uint8), pred, schema, draw_boxes=False)
        ys, xs = np.nonzero((out == CENTRE_COLOUR).all(axis=2))
        errors.append((xs.mean() + 0.5 - x, ys.mean() + 0.5 - y))
    err = np.array(errors)
    assert np.abs(err.mean(axis=0)).max() < 0.15, f"marks drawn off their points by {err.mean(axis=0)} px on average"
    assert np.abs(err).max() <= 0.5 + 1e-9


def test_drawn_box_outlines_the_pixels_of_the_box() -> None:
    pred = Prediction(100, 100, heads=(), persons=(Person((10.0, 20.0, 30.0, 40.0), 0.9, (
        Keypoint(0.0, 0.0, 0.1, 0.1, "outside"),)),))
    out = draw_prediction(np.zeros((100, 100, 3), np.uint8), pred, KeypointSchema(("nose",), (0.03,), ()),
                          show_conf=False)
    ys, xs = np.nonzero(out.any(axis=2))
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (10, 20, 29, 39), "the box covers pixels 10..29 x 20..39"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_every_format_opencv_turns(fmt: str, orientation: int) -> None:
    """``sync.reencode`` must know a PNG or WebP stored mirrored or turned 180 degrees (its size
    is the record's): the tag is all that says so."""
    from service.imageio import exif_orientation

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, fmt, exif=exif.tobytes(),
                                                  **({"lossless": True} if fmt == "WEBP" else {}))
    assert exif_orientation(buf.getvalue()) == orientation
    assert exif_orientation(_png(Image.new("L", (8, 8)))) == 1
