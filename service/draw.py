"""Drawing predictions on images with OpenCV: used by the demo, the daemon and evaluation.

Pure functions: an image goes in (``uint8`` BGR, ``[H, W, 3]``), a new image comes out; the
input is never modified. Coordinates in a ``Prediction`` are pixels of the original image, so
the image passed in must have the prediction's ``width`` x ``height`` (a differently sized image
is drawn on after scaling the coordinates, so a reduced decode still works).

Conventions:
- head boxes magenta, person boxes yellow (with the confidence);
- key points coloured by side: ``left_*`` blue, ``right_*`` orange, the rest green;
- ``visible`` points are filled circles, ``occluded`` points hollow circles, ``outside``
  points are not drawn (they claim no location), nor is any skeleton edge touching one;
- line widths, radii and text scale with the image size (reference: 640 px on the long side).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .durable import write_bytes_atomic
from .keypoints import OCCLUDED, OUTSIDE, KeypointSchema
from .record import Prediction

# BGR colours.
LEFT_COLOUR = (255, 128, 0)
RIGHT_COLOUR = (0, 128, 255)
CENTRE_COLOUR = (0, 200, 0)
HEAD_COLOUR = (255, 0, 255)
PERSON_COLOUR = (0, 255, 255)
_CAPTION_BG = (32, 32, 32)
_TILE_BG = (80, 80, 80)


def side_colour(name: str) -> tuple[int, int, int]:
    """Colour of a key point by its name: left, right or centre of the body."""
    if name.startswith("left_"):
        return LEFT_COLOUR
    if name.startswith("right_"):
        return RIGHT_COLOUR
    return CENTRE_COLOUR


def _edge_colour(a: str, b: str) -> tuple[int, int, int]:
    ca, cb = side_colour(a), side_colour(b)
    return ca if ca == cb else CENTRE_COLOUR


def marker_sizes(width: int, height: int) -> tuple[int, int]:
    """``(radius, thickness)`` in pixels for an image of this size; radius >= 3 so a hollow
    circle always has an empty centre pixel."""
    s = max(width, height) / 640.0
    return max(3, int(round(4 * s))), max(1, int(round(2 * s)))


def draw_prediction(
    image_bgr: np.ndarray,
    prediction: Prediction,
    schema: KeypointSchema,
    draw_boxes: bool = True,
    draw_skeleton: bool = True,
    show_conf: bool = True,
) -> np.ndarray:
    """Draw heads, persons, skeletons and key points on a copy of ``image_bgr``.

    ``image_bgr``: ``uint8 [H, W, 3]``; if ``(W, H)`` differs from the prediction's size the
    coordinates are scaled to the image. ``schema`` must have as many points as each person.
    Returns the annotated copy, same shape and dtype.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"draw_prediction: expected a [H, W, 3] BGR image, got shape {image_bgr.shape}")
    out = np.ascontiguousarray(image_bgr.copy())
    h, w = out.shape[:2]
    sx, sy = w / prediction.width, h / prediction.height
    radius, thick = marker_sizes(w, h)
    font_scale = max(0.35, 0.5 * max(w, h) / 640.0)

    def pt(x: float, y: float) -> tuple[int, int]:
        # The pixel that holds the point: coordinates are continuous (pixel i spans [i, i + 1),
        # the frame the engine's letterbox maps back to), so floor, not round, which drew every
        # mark half a pixel right of and below its point (a whole pixel of a 1/2 decode).
        return (min(max(math.floor(x * sx), 0), w - 1), min(max(math.floor(y * sy), 0), h - 1))

    def far(x: float, y: float) -> tuple[int, int]:
        # A box's right / bottom edge: the last pixel inside it (x2 is where the box ends).
        return (min(max(math.ceil(x * sx) - 1, 0), w - 1), min(max(math.ceil(y * sy) - 1, 0), h - 1))

    if draw_boxes:
        for head in prediction.heads:
            x1, y1, x2, y2 = head.box
            cv2.rectangle(out, pt(x1, y1), far(x2, y2), HEAD_COLOUR, thick, cv2.LINE_8)
        for person in prediction.persons:
            x1, y1, x2, y2 = person.box
            cv2.rectangle(out, pt(x1, y1), far(x2, y2), PERSON_COLOUR, thick, cv2.LINE_8)
            if show_conf:
                org = pt(x1, y1)
                cv2.putText(out, f"{person.conf:.2f}", (org[0], max(org[1] - 3, 10)),
                            cv2.FONT_HERSHEY_SIMPLEX, font_scale, PERSON_COLOUR, 1, cv2.LINE_AA)

    for person in prediction.persons:
        kps = person.keypoints
        if len(kps) != schema.count:
            raise ValueError(
                f"draw_prediction: person has {len(kps)} key points, schema has {schema.count}"
            )
        if draw_skeleton:
            for a, b in schema.skeleton:
                if kps[a].visibility == OUTSIDE or kps[b].visibility == OUTSIDE:
                    continue
                cv2.line(out, pt(kps[a].x, kps[a].y), pt(kps[b].x, kps[b].y),
                         _edge_colour(schema.names[a], schema.names[b]), thick, cv2.LINE_AA)
        for name, kp in zip(schema.names, kps):
            if kp.visibility == OUTSIDE:
                continue
            filled = kp.visibility != OCCLUDED
            # Hollow rings are 1 px wide so the centre stays visibly empty; no anti-aliasing on
            # marks, so their colour is exact (the legend and the tests rely on it).
            cv2.circle(out, pt(kp.x, kp.y), radius, side_colour(name), -1 if filled else 1, cv2.LINE_8)
    return out


def _fit_tile(image: np.ndarray, tile_w: int, tile_h: int) -> np.ndarray:
    """Resize to fit ``tile_w x tile_h`` keeping the aspect ratio; pad with grey, centred."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    r = min(tile_w / w, tile_h / h)
    nw, nh = max(1, int(round(w * r))), max(1, int(round(h * r)))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    tile = np.full((tile_h, tile_w, 3), _TILE_BG, dtype=np.uint8)
    y0, x0 = (tile_h - nh) // 2, (tile_w - nw) // 2
    tile[y0:y0 + nh, x0:x0 + nw] = resized[:, :, :3]
    return tile


def contact_sheet(
    images: Sequence[np.ndarray],
    cols: int = 4,
    tile_size: tuple[int, int] = (320, 240),
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """Lay out images in a grid: ``uint8 [rows*(tile_h+band), cols*tile_w, 3]`` BGR.

    ``tile_size`` is ``(width, height)`` of the image area of each tile; every image is scaled
    to fit it. With ``captions`` (one per image) each tile gets a dark text band on top. An
    empty ``images`` gives one blank tile.
    """
    if cols < 1:
        raise ValueError(f"contact_sheet: cols must be >= 1, got {cols}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"contact_sheet: {len(images)} images but {len(captions)} captions")
    tile_w, tile_h = tile_size
    band = 20 if captions is not None else 0
    n = max(1, len(images))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * (tile_h + band), cols * tile_w, 3), _TILE_BG, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        y, x = r * (tile_h + band), c * tile_w
        if band:
            sheet[y:y + band, x:x + tile_w] = _CAPTION_BG
            text = str(captions[i]) if captions is not None else ""
            cv2.putText(sheet, text[: max(1, tile_w // 8)], (x + 4, y + band - 6),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        sheet[y + band:y + band + tile_h, x:x + tile_w] = _fit_tile(image, tile_w, tile_h)
    return sheet


def write_png(path: Path, image_bgr: np.ndarray) -> None:
    """Encode a ``uint8 [H, W, 3]`` BGR image as PNG and write it atomically (temporary file,
    fsync, rename)."""
    ok, buf = cv2.imencode(".png", image_bgr)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image_bgr.shape} as PNG")
    write_bytes_atomic(path, buf.tobytes())
