"""Optional downscale / re-encode of an image for upload, with its record rescaled per axis.

A record's coordinates are pixels of the original image after EXIF orientation. When the image
is larger than ``max_side`` it is decoded (orientation applied), resized so the longer side is
``max_side`` and encoded as JPEG without EXIF; every box and key point is then multiplied by
``new_width / width`` in x and ``new_height / height`` in y (the two differ slightly because
each side is rounded to whole pixels). Otherwise the original bytes go up unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import cv2

from service.imageio import decode_image
from service.outputs import image_suffix

_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp", ".tif": "image/tiff",
          ".webp": "image/webp"}


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


def prepare_upload(data: bytes, record: Mapping[str, Any], max_side: int | None = None,
                   jpeg_quality: int = 90) -> UploadImage:
    """What to upload for one image: the original, or a downscaled JPEG when larger than ``max_side``."""
    suffix = image_suffix(data)
    width, height = int(record["width"]), int(record["height"])
    if not max_side or max(width, height) <= max_side:
        return UploadImage(data, suffix, _TYPES.get(suffix, "application/octet-stream"), dict(record), (1.0, 1.0))
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality: expected 1..100, got {jpeg_quality}")
    decoded = decode_image(data, max_side_hint=max_side)
    if (decoded.width, decoded.height) != (width, height):
        raise ValueError(f"record says {width}x{height}, the image decodes as {decoded.width}x{decoded.height}")
    s = max_side / max(width, height)
    new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
    pixels = cv2.resize(decoded.pixels, (new_w, new_h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    sx, sy = new_w / width, new_h / height
    return UploadImage(buf.tobytes(), ".jpg", "image/jpeg", scale_record(record, sx, sy, new_w, new_h), (sx, sy))
