"""From a scene spec to a finished camera image: camera warp, lighting, IR, noise, blur."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .people import K
from .scene import (
    CAMERAS, CANVAS_H, CANVAS_W, SLOTS, RenderedPerson, SceneSpec, canvas_visibility, head_mask, render_canvas,
    silhouette_ids,
)

OUT_W, OUT_H = 640, 480
ROOF_ROLL = (30.0, 60.0)  # the roof camera's roll range in degrees (either direction)


@dataclass(frozen=True)
class Knobs:
    """Sub-population and domain-shift controls (fractions of images)."""

    ir: float = 0.15
    crowded: float = 0.08
    child: float = 0.15
    cameras: tuple[tuple[str, float], ...] = (("mirror", 0.5), ("a_pillar", 0.3), ("dashboard", 0.2))


def sample_spec(rng: np.random.Generator, knobs: Knobs) -> SceneSpec:
    names, weights = zip(*knobs.cameras)
    w = np.array(weights, float)
    camera = str(rng.choice(names, p=w / w.sum()))
    crowded = bool(rng.random() < knobs.crowded)
    slots: list[str] = []
    if rng.random() < 0.95:
        slots.append("driver")
    if rng.random() < 0.55:
        slots.append("passenger")
    rear = ["rear_left", "rear_center", "rear_right"]
    if crowded:
        slots += rear
    else:
        slots += [r for r in rear if rng.random() < 0.3]
    if not slots:
        slots.append(str(rng.choice(["driver", "passenger"])))
    children = tuple(s for s in slots if s.startswith("rear") and rng.random() < knobs.child * (3 if crowded else 1))
    return SceneSpec(camera=camera, ir=bool(rng.random() < knobs.ir), crowded=crowded,
                     slots=tuple(slots[:5]), children=children)


def _rolled(cx: float, cy: float, a: float, raw: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The corners ``raw`` (relative to the view's centre) rotated by ``a`` radians about (cx, cy)."""
    return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in raw]


def camera_homography(rng: np.random.Generator, camera: str) -> np.ndarray:
    """3x3 map from canonical canvas pixels to output pixels for a camera position.

    The output's corners come from a quadrilateral inside the canvas, so everything the camera
    sees was drawn.
    """
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    if camera == "mirror":
        m = rng.uniform(25, 60)
        quad = [(m + j(15), m * 0.8 + j(12)), (CANVAS_W - m + j(15), m * 0.8 + j(12)),
                (CANVAS_W - m + j(15), CANVAS_H - m * 0.6 + j(12)), (m + j(15), CANVAS_H - m * 0.6 + j(12))]
    elif camera == "a_pillar":
        near, far = (rng.uniform(70, 130), rng.uniform(5, 30))
        x0, x1 = rng.uniform(5, 60), CANVAS_W - rng.uniform(5, 60)
        left = (near, CANVAS_H - near * 0.8)
        right = (far, CANVAS_H - far)
        if rng.random() < 0.5:
            left, right = right, left
        quad = [(x0, left[0]), (x1, right[0]), (x1, right[1]), (x0, left[1])]
    elif camera == "dashboard":
        top = rng.uniform(40, 90)
        quad = [(40 + j(20), top), (CANVAS_W - 40 + j(20), top),
                (CANVAS_W - 130 + j(20), CANVAS_H - 5), (130 + j(20), CANVAS_H - 5)]
    elif camera == "overhead":  # the domain-shift camera: rotated, strong keystone
        a = math.radians(rng.uniform(12, 25) * rng.choice([-1, 1]))
        cx, cy, hw, hh = CANVAS_W / 2, CANVAS_H / 2 + 20, 250, 200
        raw = [(-hw * 1.3, -hh), (hw * 1.3, -hh), (hw * 0.8, hh), (-hw * 0.8, hh)]
        quad = _rolled(cx, cy, a, raw)
    elif camera == "roof":  # a camera mounted at a slant in the roof console: the cabin rolled by ROOF_ROLL
        a = math.radians(rng.uniform(*ROOF_ROLL) * rng.choice([-1, 1]))
        c, s = abs(math.cos(a)), abs(math.sin(a))
        hw, hh = 300.0, 225.0  # the largest 4:3 view whose rolled corners stay (about) on the canvas
        fit = 1.15 * min(CANVAS_W / 2 / (hw * c + hh * s), CANVAS_H / 2 / (hw * s + hh * c))
        hw, hh = hw * fit * rng.uniform(0.95, 1.0), hh * fit * rng.uniform(0.95, 1.0)
        cx, cy = CANVAS_W / 2 + j(20), CANVAS_H / 2 + j(10)
        raw = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
        quad = _rolled(cx, cy, a, raw)
    else:
        raise ValueError(f"camera: expected one of {', '.join(CAMERAS)}; got {camera!r}")
    src = np.array(quad, np.float32)
    src[:, 0] = np.clip(src[:, 0], 0, CANVAS_W - 1)
    src[:, 1] = np.clip(src[:, 1], 0, CANVAS_H - 1)
    dst = np.array([(0, 0), (OUT_W, 0), (OUT_W, OUT_H), (0, OUT_H)], np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def _warp_points(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(pts.reshape(-1, 1, 2).astype(np.float64), h).reshape(-1, 2)


def _photometric(rng: np.random.Generator, img: np.ndarray, ir: bool) -> np.ndarray:
    f = img.astype(np.float32)
    yy, xx = np.mgrid[0:OUT_H, 0:OUT_W].astype(np.float32)
    if ir:
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
        cx, cy = OUT_W * rng.uniform(0.35, 0.65), OUT_H * rng.uniform(0.3, 0.6)
        r = np.hypot((xx - cx) / OUT_W, (yy - cy) / OUT_H)
        light = np.clip(1.5 - 1.6 * r, 0.25, 1.4)
        g = gray * light * rng.uniform(0.8, 1.2) + rng.uniform(-10, 10)
        g += rng.normal(0, rng.uniform(4, 12), g.shape)
        return np.clip(g, 0, 255).astype(np.uint8)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * (xx / OUT_W - 0.5) + np.sin(a) * (yy / OUT_H - 0.5))
    light = rng.uniform(0.55, 1.15) + rng.uniform(0.0, 0.6) * ramp
    f *= light[..., None]
    if rng.random() < 0.3:  # sun patch
        c = (rng.uniform(0, OUT_W), rng.uniform(0, OUT_H))
        r = np.hypot(xx - c[0], yy - c[1]) / rng.uniform(60, 200)
        f += (np.exp(-r**2) * rng.uniform(40, 110))[..., None]
    f *= rng.uniform(0.85, 1.15, size=3)[None, None, :]  # white balance
    f += rng.normal(0, rng.uniform(1, 8), f.shape)
    return np.clip(f, 0, 255).astype(np.uint8)


def render_image(rng: np.random.Generator, spec: SceneSpec) -> tuple[np.ndarray, list[RenderedPerson]]:
    """Render one image (H x W x 3 BGR, or H x W grayscale for IR) and its ground truth."""
    color, ids, occupants = render_canvas(rng, spec)
    h = camera_homography(rng, spec.camera)
    img = cv2.warpPerspective(color, h, (OUT_W, OUT_H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    ids_out = cv2.warpPerspective(ids, h, (OUT_W, OUT_H), flags=cv2.INTER_NEAREST, borderValue=-1)
    persons: list[RenderedPerson] = []
    slot_ids = {n: i + 1 for i, n in enumerate(SLOTS)}
    for o in occupants:
        sid = slot_ids[o.slot]
        flags = canvas_visibility(ids, o, sid)
        xy = _warp_points(h, o.points)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < OUT_W) & (xy[:, 1] >= 0) & (xy[:, 1] < OUT_H)
        flags = np.where(inside, flags, 0)
        kp = np.zeros((K, 3))
        kp[:, :2] = np.where(flags[:, None] > 0, xy, 0.0)
        kp[:, 2] = flags
        # Amodal head box: the head ellipse (with hair) through the camera warp, clipped.
        ax = (int(o.head_axes[0] * 1.05), int(o.head_axes[1] * 1.05))
        poly = cv2.ellipse2Poly((int(o.head_center[0]), int(o.head_center[1])), ax, int(o.head_roll), 0, 360, 10)
        hp = _warp_points(h, poly.astype(np.float64))
        x1, y1 = np.clip(hp.min(0), 0, [OUT_W, OUT_H])
        x2, y2 = np.clip(hp.max(0), 0, [OUT_W, OUT_H])
        full_area = math.pi * ax[0] * ax[1]
        vis_head = float(head_mask(ids, sid).sum()) / max(full_area, 1.0)
        head_box = (float(x1), float(y1), float(x2), float(y2)) if (x2 - x1 > 2 and y2 - y1 > 2) else None
        base = sid * 32
        if (flags > 0).sum() == 0 and head_box is None:
            continue
        visible_area = float(((ids_out >= base) & (ids_out < base + 32)).sum())
        alone = cv2.warpPerspective(silhouette_ids(o, sid), h, (OUT_W, OUT_H), flags=cv2.INTER_NEAREST,
                                    borderValue=-1)
        area = max(float(((alone >= base) & (alone < base + 32)).sum()), visible_area)
        persons.append(RenderedPerson(kp, head_box, min(vis_head, 1.0), area, visible_area, o.slot, o.pose,
                                      o.child))
    img = _photometric(rng, img, spec.ir)
    blur = rng.uniform(0, 1.6)
    if blur > 0.5:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    if rng.random() < 0.1:  # motion blur
        k = int(rng.integers(3, 8))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2, :] = 1.0 / k
        img = cv2.filter2D(img, -1, kern)
    return img, persons

