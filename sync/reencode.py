"""Optional downscale / re-encode of an image for upload, with its record rescaled per axis.

A record's coordinates are pixels of the original image after EXIF orientation. When the image
is larger than ``max_side`` it is decoded (orientation applied), resized so the longer side is
``max_side`` and encoded as JPEG without EXIF; every box and key point is then multiplied by
``new_width / width`` in x and ``new_height / height`` in y (the two differ slightly because
each side is rounded to whole pixels). An image a browser cannot show (TIFF, PNM, JPEG 2000,
HDR...) goes up as a JPEG of its own size. An image stored turned (a JPEG whose EXIF orientation
is not 1, or any image whose header size is the record's turned) is re-encoded upright at its
own size: Ground Truth's worker UI shows the stored pixels without applying EXIF, so the
pre-annotations (upright) would land on the wrong content and the answers come back in the
stored frame. Otherwise the original bytes go up unchanged.

A reduced JPEG decode (1/2, 1/4, 1/8) maps decoded pixel ``i`` to original pixels
``[i f, (i + 1) f)`` only when ``f`` divides the side: otherwise the last decoded pixel is
partial (or, on an axis EXIF orientation reverses, the first), and resizing all decoded
pixels to the new size stretched the image against the record by up to ``f - 1`` original
pixels. So ``decode_image`` reduces only by a factor dividing both sides (none: a full decode).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import cv2

from service.errors import ImageError
from service.imageio import MAX_PIXELS, decode_image, exif_orientation, header_size
from service.outputs import image_suffix

_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp", ".tif": "image/tiff",
          ".webp": "image/webp"}
# What a reviewer's browser shows (Ground Truth's worker page is a web page): a TIFF (a 16-bit IR
# frame), a PGM or a JPEG 2000 goes up as a JPEG of the same size instead, else the worker gets
# an empty page to label. (Label Studio links a stored JPEG as it is and this JPEG for the rest:
# ``sync.labelstudio.LabelStudioBackend.shown``.)
_BROWSER = (".jpg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class UploadImage:
    """The bytes to upload, their file suffix and MIME type, and the record in their pixels."""

    data: bytes
    suffix: str
    content_type: str
    record: dict[str, Any]
    scale_xy: tuple[float, float]


def scale_record(record: Mapping[str, Any], sx: float, sy: float, width: int, height: int) -> dict[str, Any]:
    """A copy of ``record`` with boxes ``[x1, y1, x2, y2]`` and key points scaled by (sx, sy).

    ``width``/``height`` become the new image size; the original size is kept under
    ``original_size`` and the factors under ``upload_scale``.
    """
    out = copy.deepcopy(dict(record))
    out["original_size"] = [record.get("width"), record.get("height")]
    out["width"], out["height"], out["upload_scale"] = int(width), int(height), [sx, sy]
    for item in (*out.get("heads", []), *out.get("persons", [])):
        x1, y1, x2, y2 = item["box"]
        item["box"] = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
    for person in out.get("persons", []):
        for k in person.get("keypoints", []):
            k["x"], k["y"] = k["x"] * sx, k["y"] * sy
    return out


def _stored_turned(data: bytes, width: int, height: int) -> bool:
    """Whether the stored pixels are not the record's upright frame: the EXIF orientation (of a
    JPEG, or a PNG's or WebP's, which OpenCV applies too) is not 1, or the header's size is the
    record's turned. False for a header that cannot be read (only decodable images have records).
    (A PNG mirrored or turned 180 degrees, or a square one turned, has its record's size: only its
    tag tells.)"""
    try:
        if exif_orientation(data) != 1:
            return True
        size = header_size(data)
    except ImageError:
        return False
    return size is not None and width != height and tuple(size) == (height, width)


def _encode(pixels: Any, jpeg_quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:  # of uint8 BGR pixels: memory ran out (OpenCV reports it so); worth another try, not the image's fault
        raise MemoryError("JPEG encoding failed (out of memory?)")
    return buf.tobytes()


def prepare_upload(data: bytes, record: Mapping[str, Any], max_side: int | None = None,
                   jpeg_quality: int = 90) -> UploadImage:
    """What to upload for one image: the original, a downscaled JPEG when larger than
    ``max_side``, or an upright JPEG of the same size when stored turned (module docstring)."""
    suffix = image_suffix(data)
    width, height = int(record["width"]), int(record["height"])
    # The daemon accepted and annotated this image under its own drop.max_pixels, which may be
    # above the decoder's default: the upload decodes what was accepted, whatever its size.
    max_pixels = max(MAX_PIXELS, width * height)
    downscale = bool(max_side and max(width, height) > max_side)
    if not downscale and suffix in _BROWSER and not _stored_turned(data, width, height):
        return UploadImage(data, suffix, _TYPES[suffix], dict(record), (1.0, 1.0))
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality: expected 1..100, got {jpeg_quality}")
    if not downscale:  # upright (a browser's format), same size: the record's coordinates hold as they are
        decoded = decode_image(data, max_pixels=max_pixels)
        if (decoded.width, decoded.height) != (width, height):
            raise ValueError(f"record says {width}x{height}, the image decodes as {decoded.width}x{decoded.height}")
        return UploadImage(_encode(decoded.pixels, jpeg_quality), ".jpg", "image/jpeg", dict(record), (1.0, 1.0))
    side = int(max_side or 0)
    decoded = decode_image(data, max_pixels=max_pixels, max_side_hint=side)  # reduced by a factor dividing both sides: exact
    if (decoded.width, decoded.height) != (width, height):
        raise ValueError(f"record says {width}x{height}, the image decodes as {decoded.width}x{decoded.height}")
    s = side / max(width, height)
    new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
    pixels = cv2.resize(decoded.pixels, (new_w, new_h), interpolation=cv2.INTER_AREA)
    sx, sy = new_w / width, new_h / height
    return UploadImage(_encode(pixels, jpeg_quality), ".jpg", "image/jpeg", scale_record(record, sx, sy, new_w, new_h),
                       (sx, sy))
