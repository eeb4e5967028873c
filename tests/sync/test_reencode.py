"""Upload re-encoding: the uploaded pixels are where the uploaded record says, in the upright frame."""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from service.imageio import _jpeg_info
from sync.reencode import prepare_upload

SQUARE = 48

# How the stored pixels are made from the upright image, per EXIF orientation (the inverse of
# what a viewer that honours the tag does to show them).
STORE = {1: lambda a: a, 3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
         6: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
         8: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE)}


def _with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an EXIF APP1 segment holding only the Orientation tag."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _image(width: int, height: int, orientation: int = 1, near: bool = False) -> tuple[bytes, tuple[float, float]]:
    """A JPEG, upright ``width`` x ``height`` (stored turned for ``orientation``), black with a
    white square near the far corner (``near``: the top left one); and the square's centre in
    upright original pixels."""
    img = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (32, 32) if near else (width - 80, height - 80)
    img[y0:y0 + SQUARE, x0:x0 + SQUARE] = 255
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(STORE[orientation](img)), [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    data = buf.tobytes()
    return (data if orientation == 1 else _with_orientation(data, orientation)), (x0 + SQUARE / 2, y0 + SQUARE / 2)


def _centroid(pixels: np.ndarray, x: float, y: float, r: float) -> tuple[float, float]:
    """Brightness centroid (pixel corners at integers) in a window of half-size ``r`` around x, y."""
    x0, y0 = max(0, int(x - r)), max(0, int(y - r))
    win = pixels[y0:int(y + r), x0:int(x + r), 1].astype(np.float64)
    ys, xs = np.mgrid[y0:y0 + win.shape[0], x0:x0 + win.shape[1]]
    return float((xs * win).sum() / win.sum()) + 0.5, float((ys * win).sum() / win.sum()) + 0.5


def _record(width: int, height: int, centre: tuple[float, float]) -> dict:
    x, y = centre
    return {"width": width, "height": height, "heads": [{"box": [x - 24, y - 24, x + 24, y + 24], "conf": 0.9}],
            "persons": []}


@pytest.mark.parametrize("width, height, max_side, orientation, near", [
    (4001, 3001, 500, 1, False),  # sides no reduced decode divides: 4001 / 8 rounds up (the audit's 5.6 px)
    (2001, 1501, 500, 1, False),
    (4007, 2999, 500, 1, False),
    (2008, 1504, 250, 1, False),  # 1/8 decode, exact
    (2008, 1504, 250, 6, False),  # 1/8 decode of an EXIF-turned image
    (2001, 1501, 500, 3, True),   # the partial blocks come first on axes the orientation reverses
])
def test_downscaled_upload_keeps_the_content_where_the_record_says(width: int, height: int, max_side: int,
                                                                   orientation: int, near: bool) -> None:
    data, (tx, ty) = _image(width, height, orientation, near)
    up = prepare_upload(data, _record(width, height, (tx, ty)), max_side=max_side)
    pixels = cv2.imdecode(np.frombuffer(up.data, np.uint8), cv2.IMREAD_COLOR)
    assert (pixels.shape[1], pixels.shape[0]) == (up.record["width"], up.record["height"])
    assert max(pixels.shape[:2]) == max_side
    sx, sy = up.scale_xy
    x1, y1, x2, y2 = up.record["heads"][0]["box"]
    cx, cy = _centroid(pixels, (x1 + x2) / 2, (y1 + y2) / 2, SQUARE * sx)
    assert abs(cx / sx - tx) < 0.5 and abs(cy / sy - ty) < 0.5, (cx / sx - tx, cy / sy - ty)


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("max_side", [None, 1000])
def test_an_exif_turned_jpeg_goes_up_upright_without_the_tag(orientation: int, max_side: int | None) -> None:
    """Ground Truth's worker UI shows the stored pixels, not EXIF-turned ones, while the
    manifest's sizes and coordinates are upright: the upload must be upright itself."""
    data, centre = _image(640, 480, orientation)
    record = _record(640, 480, centre)
    up = prepare_upload(data, record, max_side=max_side)
    width, height, tag, _ = _jpeg_info(up.data)
    assert (width, height, tag) == (640, 480, 1) and up.suffix == ".jpg" and up.content_type == "image/jpeg"
    assert up.record == record and up.scale_xy == (1.0, 1.0)
    stored = cv2.imdecode(np.frombuffer(up.data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    cx, cy = _centroid(stored, *centre, SQUARE)
    assert abs(cx - centre[0]) < 0.5 and abs(cy - centre[1]) < 0.5


def test_an_upright_image_within_max_side_goes_up_as_it_is() -> None:
    data, centre = _image(640, 480)
    assert prepare_upload(data, _record(640, 480, centre), max_side=1000).data == data
    assert prepare_upload(data, _record(640, 480, centre)).data == data
    tagged = _with_orientation(data, 1)
    assert prepare_upload(tagged, _record(640, 480, centre)).data == tagged
    ok, png = cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))
    assert prepare_upload(png.tobytes(), {"width": 64, "height": 48}).data == png.tobytes()


@pytest.mark.parametrize("ext", [".tiff", ".pgm", ".jp2"])
def test_an_image_a_browser_cannot_show_goes_up_as_a_jpeg_of_its_size(ext: str) -> None:
    """Ground Truth's worker page is a web page: a 16-bit IR TIFF, a PGM or a JPEG 2000 went up
    as it was, and the worker saw nothing to label."""
    img = np.zeros((48, 64), np.uint16 if ext == ".tiff" else np.uint8)
    img[10:20, 30:40] = 4000 if ext == ".tiff" else 250
    data = cv2.imencode(ext, img)[1].tobytes()
    record = {"width": 64, "height": 48, "persons": [], "heads": [{"box": [30.0, 10.0, 40.0, 20.0], "conf": 0.9}]}
    up = prepare_upload(data, record)
    assert (up.suffix, up.content_type, up.scale_xy, up.record) == (".jpg", "image/jpeg", (1.0, 1.0), record)
    shown = cv2.imdecode(np.frombuffer(up.data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert shown.shape == (48, 64) and shown[12:18, 32:38].mean() > 200 and shown[30:, :20].mean() < 20


def test_an_image_the_daemon_accepted_above_the_decoders_default_limit_still_goes_up() -> None:
    """drop.max_pixels may be above the decoder's default 50 MP: an image the daemon accepted
    and annotated under it was refused here, and the uploader failed it for good."""
    w, h = 8000, 6400  # 51.2 MP, one flat colour: a small PNG
    ok, buf = cv2.imencode(".png", np.full((h, w), 90, np.uint8))
    assert ok
    up = prepare_upload(buf.tobytes(), {"width": w, "height": h, "heads": [], "persons": []}, max_side=1000)
    assert up.suffix == ".jpg" and cv2.imdecode(np.frombuffer(up.data, np.uint8), cv2.IMREAD_COLOR).shape == (800, 1000, 3)


def test_running_out_of_memory_is_not_the_images_fault(tmp_path) -> None:
    """OpenCV reports a failed allocation as an ordinary error, which came out as ImageError (or
    ValueError): the uploader failed the image for good. It is a MemoryError now, which the
    uploader lets through (the batch resumes later). A real address-space limit, in a child."""
    import subprocess
    import sys
    import textwrap

    from procs import REPO, command_env

    script = textwrap.dedent("""
        import os, resource
        import cv2, numpy as np
        from sync.reencode import prepare_upload
        w, h = 6000, 4000
        ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
        data = buf.tobytes()
        vm = int(open(f"/proc/{os.getpid()}/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + 40_000_000, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            prepare_upload(data, {"width": w, "height": h, "heads": [], "persons": []}, max_side=1000)
        except BaseException as exc:
            print(type(exc).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=command_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "MemoryError", out.stdout + out.stderr


@pytest.mark.parametrize("fmt, width, height, orientation", [
    ("PNG", 480, 480, 3), ("PNG", 480, 480, 6), ("PNG", 640, 480, 2), ("WEBP", 640, 480, 3), ("WEBP", 480, 480, 8),
])
def test_a_tagged_png_or_webp_goes_up_upright(fmt: str, width: int, height: int, orientation: int) -> None:
    """A PNG's eXIf or a WebP's EXIF orientation is applied by the decoder (so the record is
    upright) but not by Ground Truth's worker page: only JPEG tags were read, and a PNG or WebP
    mirrored, turned 180 degrees or square went up as stored (geometry audit), its
    pre-annotations on mirrored or turned content."""
    import io

    from PIL import Image

    from service.imageio import decode_image

    t = Image.Transpose
    stored_as = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 6: t.ROTATE_90, 8: t.ROTATE_270}[orientation]
    ys, xs = np.mgrid[0:height, 0:width]
    upright = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) * 127 // (width + height)], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(upright).transpose(stored_as).save(buf, fmt, exif=exif.tobytes(),
                                                       **({"lossless": True} if fmt == "WEBP" else {}))
    data = buf.getvalue()
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (width, height)
    up = prepare_upload(data, {"width": width, "height": height, "heads": [], "persons": []})
    shown = cv2.imdecode(np.frombuffer(up.data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert shown.shape[:2] == (height, width)
    # HEAD: the stored bytes as they are (mean difference 40 to 110 against the record's frame)
    assert np.abs(shown.astype(int) - decoded.pixels.astype(int)).mean() < 8


def test_a_png_whose_exif_comes_after_its_image_data_goes_up_upright() -> None:
    """Review: the PNG walk stopped at the first IDAT, but libpng (so OpenCV, so the record)
    applies an eXIf chunk written after the image data too, as some metadata tools write it."""
    import io
    import struct
    import zlib

    from PIL import Image

    from service.imageio import decode_image, exif_orientation

    ys, xs = np.mgrid[0:48, 0:64]
    upright = np.stack([xs * 4, ys * 5, (xs + ys) * 2], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 3
    buf = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_180).save(buf, "PNG", exif=exif.tobytes())
    data, chunks, at = buf.getvalue(), [], 8
    while at < len(buf.getvalue()):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append((kind, data[at:at + 12 + size]))
        at += 12 + size
    order = [k for k, _ in chunks]
    assert order.index(b"eXIf") < order.index(b"IDAT")
    moved = [c for k, c in chunks if k not in (b"eXIf", b"IEND")] + [c for k, c in chunks if k == b"eXIf"] + \
        [c for k, c in chunks if k == b"IEND"]
    after = data[:8] + b"".join(moved)
    assert zlib.crc32(after[8:]) != zlib.crc32(data[8:])  # the chunk really moved
    decoded = decode_image(after)
    assert np.abs(decoded.pixels[..., ::-1].astype(int) - upright.astype(int)).mean() < 1  # OpenCV turned it
    assert exif_orientation(after) == 3  # HEAD: 1
    up = prepare_upload(after, {"width": 64, "height": 48, "heads": [], "persons": []})
    shown = cv2.imdecode(np.frombuffer(up.data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.abs(shown.astype(int) - decoded.pixels.astype(int)).mean() < 8
