"""Render one synthetic cabin image with exact ground truth.

The scene is drawn back to front (painter's order) on a canonical canvas together with an
*id buffer* that records, per pixel, which object or which part of which person is in front.
A key point is ``visible`` when the top-most thing at its pixel is a part of its own person
that carries it, ``occluded`` when anything else covers it (a seat, the wheel, another person,
the person's own arm, or the head itself for the far eye and ear of a turned head), and
``outside`` when the camera's view (a perspective warp of the canvas) does not contain it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .people import (
    IDX, K, OWNER_PARTS, P_FARM_L, P_FARM_R, P_HAIR, P_HAT, P_HEAD, P_NECK, P_SHIN_L,
    P_SHIN_R, P_THIGH_L, P_THIGH_R, P_TORSO, P_UARM_L, P_UARM_R, Occupant, make_occupant,
)
from service.keypoints import CABIN19_NAMES

CANVAS_W, CANVAS_H = 720, 540
OBJ_BG, OBJ_SEAT, OBJ_WHEEL, OBJ_PILLAR, OBJ_CONSOLE, OBJ_CHILDSEAT = 1000, 1001, 1002, 1003, 1004, 1005
CAMERAS = ("mirror", "a_pillar", "dashboard", "overhead", "roof")

# Seat slots: name -> (x of the seat centre, y of the head centre, scale, row).
SLOTS = {
    "driver": (505.0, 205.0, 1.0, "front"),
    "passenger": (215.0, 205.0, 1.0, "front"),
    "rear_left": (575.0, 172.0, 0.62, "rear"),
    "rear_center": (360.0, 168.0, 0.6, "rear"),
    "rear_right": (145.0, 172.0, 0.62, "rear"),
}


@dataclass(frozen=True)
class SceneSpec:
    """What to render: camera, lighting and who sits where."""

    camera: str
    ir: bool
    crowded: bool
    slots: tuple[str, ...]
    children: tuple[str, ...]


@dataclass
class RenderedPerson:
    keypoints: np.ndarray  # (K, 3): x, y, v (2 visible, 1 occluded, 0 outside; outside -> 0, 0)
    head_box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in image pixels
    head_visible_fraction: float
    area: float  # amodal area: pixels the person would cover in the image with nothing in front
    visible_area: float  # pixels of the person actually in front (the modal segment)
    slot: str
    pose: str
    child: bool


class Painter:
    """Draws filled shapes on a colour canvas and an id buffer at once."""

    def __init__(self, color: np.ndarray, ids: np.ndarray) -> None:
        self.color, self.ids = color, ids

    def poly(self, pts: np.ndarray, color: tuple[int, ...], oid: int, outline: bool = True) -> None:
        p = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.color, [p], color, cv2.LINE_AA)
        cv2.fillPoly(self.ids, [p], oid)
        if outline:
            dark = tuple(int(c * 0.6) for c in color)
            cv2.polylines(self.color, [p], True, dark, 1, cv2.LINE_AA)

    def capsule(self, a: np.ndarray, b: np.ndarray, width: float, color: tuple[int, ...], oid: int) -> None:
        w = max(int(round(width)), 1)
        pa, pb = tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b)
        dark = tuple(int(c * 0.6) for c in color)
        cv2.line(self.color, pa, pb, dark, w + 2, cv2.LINE_AA)
        cv2.line(self.color, pa, pb, color, w, cv2.LINE_AA)
        cv2.line(self.ids, pa, pb, oid, w + 2)

    def ellipse(self, c: tuple[float, float], axes: tuple[float, float], angle: float,
                color: tuple[int, ...], oid: int, start: float = 0, end: float = 360) -> None:
        cc = (int(round(c[0])), int(round(c[1])))
        ax = (max(int(round(axes[0])), 1), max(int(round(axes[1])), 1))
        cv2.ellipse(self.color, cc, ax, angle, start, end, color, -1, cv2.LINE_AA)
        cv2.ellipse(self.color, cc, ax, angle, start, end, tuple(int(v * 0.6) for v in color), 1, cv2.LINE_AA)
        cv2.ellipse(self.ids, cc, ax, angle, start, end, oid, -1)


def _cabin_palette(rng: np.random.Generator) -> dict[str, tuple[int, int, int]]:
    base = int(rng.integers(30, 150))
    tint = rng.integers(-20, 20, size=3)
    seat = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    return {
        "seat": seat,  # type: ignore[dict-item]
        "headrest": tuple(int(np.clip(c + 15, 0, 255)) for c in seat),  # type: ignore[dict-item]
        "trim": tuple(int(v) for v in rng.integers(20, 90, size=3)),  # type: ignore[dict-item]
        "roof": tuple(int(v) for v in rng.integers(120, 220, size=3)),  # type: ignore[dict-item]
        "wheel": tuple(int(v) for v in rng.integers(10, 50, size=3)),  # type: ignore[dict-item]
    }


def _background(rng: np.random.Generator, ir: bool) -> np.ndarray:
    """Windows: a bright sky gradient with blobs (trees, buildings); dark at night (IR)."""
    img = np.zeros((CANVAS_H, CANVAS_W, 3), np.uint8)
    top = rng.integers(170, 256, size=3) if not ir else rng.integers(5, 40, size=3)
    bottom = rng.integers(90, 230, size=3) if not ir else rng.integers(5, 40, size=3)
    t = np.linspace(0, 1, CANVAS_H)[:, None, None]
    img[:] = (top * (1 - t) + bottom * t).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        c = (int(rng.integers(0, CANVAS_W)), int(rng.integers(0, CANVAS_H)))
        ax = (int(rng.integers(20, 120)), int(rng.integers(10, 80)))
        col = tuple(int(v) for v in (rng.integers(30, 200, size=3) if not ir else rng.integers(0, 50, size=3)))
        cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(2, 6)))


def _draw_person(pt: Painter, o: Occupant, slot_id: int, layer: str) -> None:
    """Draw the parts of one occupant that belong to ``layer``: 'behind_seat' or 'body'."""
    p = o.points
    s = o.scale
    base = slot_id * 32
    sleeve = o.shirt
    limbs = {"left": (IDX["left_shoulder"], IDX["left_elbow"], IDX["left_wrist"], P_UARM_L, P_FARM_L),
             "right": (IDX["right_shoulder"], IDX["right_elbow"], IDX["right_wrist"], P_UARM_R, P_FARM_R)}

    def arm(side: str) -> None:
        sh, el, wr, pu, pf = limbs[side]
        pt.capsule(p[sh], p[el], 30 * s, sleeve, base + pu)
        pt.capsule(p[el], p[wr], 24 * s, o.skin if o.hair_style % 2 else sleeve, base + pf)
        pt.ellipse(tuple(p[wr]), (11 * s, 11 * s), 0, o.skin, base + pf)

    if layer == "behind_seat":
        for side in ("left", "right"):
            if o.arm_behind_seat.get(side):
                arm(side)
        return
    # Legs (towards the camera, drawn first: the torso sits on them).
    for side, pth, psh in (("left", P_THIGH_L, P_SHIN_L), ("right", P_THIGH_R, P_SHIN_R)):
        hip, knee, ankle = p[IDX[f"{side}_hip"]], p[IDX[f"{side}_knee"]], p[IDX[f"{side}_ankle"]]
        pt.capsule(knee, ankle, 38 * s, o.trousers, base + psh)
        pt.capsule(hip, knee, 48 * s, o.trousers, base + pth)
    if o.hair_style == 3:  # long hair falls behind the shoulders
        c = o.head_center
        pt.ellipse((c[0], c[1] + o.head_axes[1] * 0.6), (o.head_axes[0] * 1.25, o.head_axes[1] * 1.3),
                   o.head_roll, o.hair, base + P_HAIR)
    for side in ("left", "right"):
        if o.arm_behind_torso.get(side) and not o.arm_behind_seat.get(side):
            arm(side)
    ls, rs = p[IDX["left_shoulder"]], p[IDX["right_shoulder"]]
    lh, rh = p[IDX["left_hip"]], p[IDX["right_hip"]]
    out = (ls - rs) / (np.linalg.norm(ls - rs) + 1e-6) * 14 * s
    torso = np.array([ls + out + [0, -6 * s], rs - out + [0, -6 * s], rh - out * 0.6 + [0, 12 * s],
                      lh + out * 0.6 + [0, 12 * s]])
    pt.poly(torso, o.shirt, base + P_TORSO)
    neck = p[IDX["neck"]]
    pt.capsule(neck + [0, 4 * s], np.array(o.head_center) + [0, o.head_axes[1] * 0.4], 30 * s, o.skin, base + P_NECK)
    # Head, ears, face.
    for ear in ("left_ear", "right_ear"):
        if IDX[ear] not in o.self_occluded:
            pt.ellipse(tuple(p[IDX[ear]]), (7 * s, 12 * s), o.head_roll, tuple(int(c * 0.9) for c in o.skin),
                       base + P_HEAD)
    pt.ellipse(o.head_center, o.head_axes, o.head_roll, o.skin, base + P_HEAD)
    if o.hair_style in (0, 3):
        pt.ellipse(o.head_center, (o.head_axes[0] * 1.04, o.head_axes[1] * 1.04), o.head_roll, o.hair,
                   base + P_HAIR, 180 + 10 * o.yaw, 360 + 10 * o.yaw)
    elif o.hair_style == 1:
        pt.ellipse(o.head_center, (o.head_axes[0] * 1.02, o.head_axes[1] * 1.02), o.head_roll, o.hair,
                   base + P_HAIR, 200, 340)
    # The face is skin over the hair: eyes, nose and mouth are never under hair.
    pt.ellipse(o.face_center, (o.head_axes[0] * 0.78, o.head_axes[1] * 0.74), o.head_roll, o.skin,
               base + P_HEAD)
    if o.hat is not None:
        c = np.array(o.head_center)
        up = np.array([math.sin(math.radians(o.head_roll)), -math.cos(math.radians(o.head_roll))])
        pt.ellipse(tuple(c + up * o.head_axes[1] * 0.55), (o.head_axes[0] * 1.1, o.head_axes[1] * 0.55),
                   o.head_roll, o.hat, base + P_HAT, 180, 360)
    dark = (30, 30, 40)
    for eye in ("left_eye", "right_eye"):
        if IDX[eye] not in o.self_occluded:
            e = p[IDX[eye]]
            if o.eyes_closed:
                pt.capsule(e - [4 * s, 0], e + [4 * s, 0], 2, dark, base + P_HEAD)
            else:
                cv2.circle(pt.color, (int(e[0]), int(e[1])), max(int(4 * s), 1), dark, -1, cv2.LINE_AA)
    n = p[IDX["nose"]]
    cv2.circle(pt.color, (int(n[0]), int(n[1])), max(int(4 * s), 1), tuple(int(c * 0.75) for c in o.skin), -1)
    m = p[IDX["mouth"]]
    cv2.line(pt.color, (int(m[0] - 8 * s), int(m[1])), (int(m[0] + 8 * s), int(m[1])), (40, 40, 120),
             max(int(3 * s), 1), cv2.LINE_AA)
    for side in ("left", "right"):
        if not o.arm_behind_torso.get(side) and not o.arm_behind_seat.get(side):
            arm(side)


def _seat(pt: Painter, cx: float, top: float, width: float, height: float, headrest_y: float,
          scale: float, pal: dict) -> None:
    back = np.array([[cx - width / 2, top], [cx + width / 2, top], [cx + width / 2 * 1.08, top + height],
                     [cx - width / 2 * 1.08, top + height]])
    pt.poly(back, pal["seat"], OBJ_SEAT)
    pt.poly(np.array([[cx - 38 * scale, headrest_y], [cx + 38 * scale, headrest_y],
                      [cx + 34 * scale, headrest_y + 55 * scale], [cx - 34 * scale, headrest_y + 55 * scale]]),
            pal["headrest"], OBJ_SEAT)


def render_canvas(rng: np.random.Generator, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray, list[Occupant]]:
    """Draw the cabin and its occupants on the canonical canvas; return colour, ids, occupants."""
    pal = _cabin_palette(rng)
    color = _background(rng, spec.ir)
    ids = np.full((CANVAS_H, CANVAS_W), OBJ_BG, np.int32)
    pt = Painter(color, ids)
    # Roof, pillars framing the windows.
    pt.poly(np.array([[0, 0], [CANVAS_W, 0], [CANVAS_W, 28], [0, 28]]), pal["roof"], OBJ_PILLAR, False)
    wheel = None
    if "driver" in spec.slots:
        dx = SLOTS["driver"][0]
        wheel = (dx - 8 + rng.normal(0, 6), 468 + rng.normal(0, 8), 112.0, 62.0)
    occupants: dict[str, Occupant] = {}
    for name in spec.slots:
        x, y, sc, _ = SLOTS[name]
        if spec.crowded and name.startswith("rear"):
            x = 360 + (x - 360) * 0.72
        occupants[name] = make_occupant(rng, name, (x, y), sc, name in spec.children,
                                        wheel if name == "driver" else None, spec.ir)
    ops: list[tuple[float, Callable[[], None]]] = []
    # Rear bench.
    ops.append((10.0, lambda: pt.poly(np.array([[70, 150], [650, 150], [670, 420], [50, 420]]), pal["seat"], OBJ_SEAT)))
    for name in ("rear_left", "rear_center", "rear_right"):
        x = SLOTS[name][0]
        ops.append((10.5, lambda x=x: pt.poly(np.array([[x - 32, 108], [x + 32, 108], [x + 30, 150], [x - 30, 150]]),
                                             pal["headrest"], OBJ_SEAT)))
    slot_ids = {n: i + 1 for i, n in enumerate(SLOTS)}
    for name, o in occupants.items():
        row = SLOTS[name][3]
        d0 = 12.0 if row == "rear" else 22.0
        if spec.crowded and name == "rear_center":
            d0 += 0.5
        sid = slot_ids[name]
        ops.append((d0 - 3.0 if row == "rear" else d0 - 1.0,
                    lambda o=o, sid=sid: _draw_person(pt, o, sid, "behind_seat")))
        ops.append((d0, lambda o=o, sid=sid: _draw_person(pt, o, sid, "body")))
        if o.child and row == "rear":
            x = float(o.points[IDX["neck"]][0])
            hy = float(o.points[IDX["left_hip"]][1])
            ops.append((d0 + 0.2, lambda x=x, hy=hy: pt.poly(
                np.array([[x - 60, hy - 20], [x + 60, hy - 20], [x + 66, hy + 50], [x - 66, hy + 50]]),
                (60, 60, 70), OBJ_CHILDSEAT)))
    for name in ("driver", "passenger"):
        x = SLOTS[name][0]
        ops.append((20.0, lambda x=x: _seat(pt, x, 235, 190, 320, 160, 1.0, pal)))
    ops.append((31.0, lambda: pt.poly(np.array([[300, 420], [420, 420], [440, 540], [280, 540]]), pal["trim"], OBJ_CONSOLE)))
    if wheel is not None:
        wcx, wcy, wrx, wry = wheel
        ops.append((30.0, lambda: _wheel(pt, wcx, wcy, wrx, wry, pal)))
        drv = occupants["driver"]
        if drv.pose == "wheel":  # hands grip the rim: forearms on top of it
            ops.append((30.5, lambda: _forearms(pt, drv, slot_ids["driver"])))
    for x0 in (0, CANVAS_W - 46):
        ops.append((40.0, lambda x0=x0: pt.poly(np.array([[x0, 0], [x0 + 46, 0], [x0 + 46, CANVAS_H], [x0, CANVAS_H]]),
                                               pal["trim"], OBJ_PILLAR)))
    for _, op in sorted(ops, key=lambda t: t[0]):
        op()
    return color, ids, list(occupants.values())


def _wheel(pt: Painter, cx: float, cy: float, rx: float, ry: float, pal: dict) -> None:
    c = (int(cx), int(cy))
    cv2.ellipse(pt.color, c, (int(rx), int(ry)), 0, 0, 360, pal["wheel"], 16, cv2.LINE_AA)
    cv2.ellipse(pt.ids, c, (int(rx), int(ry)), 0, 0, 360, OBJ_WHEEL, 16)
    for ang in (200, 340, 90):
        e = (int(cx + rx * math.cos(math.radians(ang))), int(cy + ry * math.sin(math.radians(ang))))
        cv2.line(pt.color, c, e, pal["wheel"], 12, cv2.LINE_AA)
        cv2.line(pt.ids, c, e, OBJ_WHEEL, 12)
    cv2.ellipse(pt.color, c, (30, 22), 0, 0, 360, pal["wheel"], -1, cv2.LINE_AA)
    cv2.ellipse(pt.ids, c, (30, 22), 0, 0, 360, OBJ_WHEEL, -1)


def _forearms(pt: Painter, o: Occupant, sid: int) -> None:
    p, s = o.points, o.scale
    for el, wr, part in (("left_elbow", "left_wrist", P_FARM_L), ("right_elbow", "right_wrist", P_FARM_R)):
        a, b = p[IDX[el]], p[IDX[wr]]
        mid = a + (b - a) * 0.45
        pt.capsule(mid, b, 24 * s, o.skin if o.hair_style % 2 else o.shirt, sid * 32 + part)
        pt.ellipse(tuple(b), (11 * s, 11 * s), 0, o.skin, sid * 32 + part)


def canvas_visibility(ids: np.ndarray, o: Occupant, sid: int) -> np.ndarray:
    """(K,) flags on the canvas: 2 visible, 1 occluded (outside is decided after the camera warp)."""
    flags = np.ones(K, np.int32)
    for k, name in enumerate(CABIN19_NAMES):
        if k in o.self_occluded:
            continue
        x, y = o.points[k]
        xi, yi = int(round(x)), int(round(y))
        if not (1 <= xi < CANVAS_W - 1 and 1 <= yi < CANVAS_H - 1):
            continue
        patch = ids[yi - 1:yi + 2, xi - 1:xi + 2].ravel()
        owners = {sid * 32 + p for p in OWNER_PARTS[name]}
        if sum(int(v) in owners for v in patch) >= 5:
            flags[k] = 2
    return flags


def silhouette_ids(o: Occupant, sid: int) -> np.ndarray:
    """Id buffer of one occupant drawn alone on the canvas (every part, nothing in front):
    the amodal silhouette, in the same ids as ``render_canvas``'s buffer."""
    ids = np.full((CANVAS_H, CANVAS_W), OBJ_BG, np.int32)
    pt = Painter(np.zeros((CANVAS_H, CANVAS_W, 3), np.uint8), ids)
    _draw_person(pt, o, sid, "behind_seat")
    _draw_person(pt, o, sid, "body")
    return ids


def head_mask(ids: np.ndarray, sid: int) -> np.ndarray:
    base = sid * 32
    return (ids == base + P_HEAD) | (ids == base + P_HAIR) | (ids == base + P_HAT)
