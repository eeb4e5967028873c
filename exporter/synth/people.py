"""Occupants of the synthetic cabin: poses, 2D skeletons and the parts that are drawn.

A person is built in canonical cabin coordinates (pixels of the canonical canvas, y down),
facing the camera, so the person's *left* side appears on the image's *right*. The
skeleton follows the cabin-19 schema (``service.keypoints.CABIN19_NAMES``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from service.keypoints import CABIN19_NAMES

K = len(CABIN19_NAMES)
IDX = {n: i for i, n in enumerate(CABIN19_NAMES)}

# Part ids inside one person (the id buffer stores person_slot * 32 + part).
(P_THIGH_L, P_THIGH_R, P_SHIN_L, P_SHIN_R, P_TORSO, P_NECK, P_HEAD,
 P_UARM_L, P_UARM_R, P_FARM_L, P_FARM_R, P_HAIR, P_HAT) = range(1, 14)

# Which of the person's own parts "carry" each key point: a point is visible when the top-most
# drawn thing at its pixel is one of these parts of the same person.
OWNER_PARTS: dict[str, tuple[int, ...]] = {
    "nose": (P_HEAD,), "left_eye": (P_HEAD,), "right_eye": (P_HEAD,),
    "left_ear": (P_HEAD, P_HAIR), "right_ear": (P_HEAD, P_HAIR), "mouth": (P_HEAD,),
    "neck": (P_NECK, P_TORSO),
    "left_shoulder": (P_TORSO, P_UARM_L), "right_shoulder": (P_TORSO, P_UARM_R),
    "left_elbow": (P_UARM_L, P_FARM_L), "right_elbow": (P_UARM_R, P_FARM_R),
    "left_wrist": (P_FARM_L,), "right_wrist": (P_FARM_R,),
    "left_hip": (P_TORSO, P_THIGH_L), "right_hip": (P_TORSO, P_THIGH_R),
    "left_knee": (P_THIGH_L, P_SHIN_L), "right_knee": (P_THIGH_R, P_SHIN_R),
    "left_ankle": (P_SHIN_L,), "right_ankle": (P_SHIN_R,),
}

ARM_POSES = ("lap", "wheel", "raised", "crossed", "phone", "reach_back", "window", "wave")
SKIN_TONES = ((198, 226, 255), (160, 196, 234), (120, 160, 205), (90, 125, 170), (60, 85, 120), (45, 60, 90))
HAIR_TONES = ((20, 20, 25), (30, 45, 70), (40, 70, 120), (90, 140, 190), (170, 170, 175), (20, 30, 60))


@dataclass
class Occupant:
    """One person: key points (K x 2, canonical pixels), drawing parameters and layers."""

    slot: str
    scale: float
    points: np.ndarray
    head_center: tuple[float, float]
    head_axes: tuple[float, float]
    face_center: tuple[float, float]  # centre of the skin-coloured face region (drawn over hair)
    head_roll: float
    yaw: float
    eyes_closed: bool
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]
    hair_style: int
    hat: tuple[int, int, int] | None
    arm_behind_seat: dict[str, bool] = field(default_factory=dict)
    arm_behind_torso: dict[str, bool] = field(default_factory=dict)
    self_occluded: set[int] = field(default_factory=set)
    pose: str = "lap"
    child: bool = False


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _elbow_between(shoulder: np.ndarray, wrist: np.ndarray, upper: float, fore: float, outward: float) -> np.ndarray:
    """Elbow position for a two-bone arm reaching ``wrist``, bending to the ``outward`` side (+1 image right)."""
    d = wrist - shoulder
    dist = float(np.linalg.norm(d)) + 1e-6
    dist_c = min(dist, upper + fore - 1e-3)
    a = (upper**2 - fore**2 + dist_c**2) / (2 * dist_c)
    h = math.sqrt(max(upper**2 - a**2, 0.0))
    u = d / dist
    perp = np.array([-u[1], u[0]])
    if perp[0] * outward < 0:
        perp = -perp
    return shoulder + u * a + perp * h


def make_occupant(
    rng: np.random.Generator,
    slot: str,
    anchor: tuple[float, float],
    scale: float,
    child: bool,
    wheel: tuple[float, float, float, float] | None,
    palette_ir: bool,
) -> Occupant:
    """Sample one occupant seated at ``anchor`` (x of the seat centre, y of the head centre).

    ``wheel`` is (cx, cy, rx, ry) of the steering wheel for the driver, else None.
    """
    s = scale * (0.72 if child else 1.0) * rng.uniform(0.9, 1.1)
    cx, head_y = anchor
    cx += rng.normal(0, 12 * scale)
    head_y += rng.normal(0, 8 * scale) + (35 * scale if child else 0.0)
    head_h = 78 * s * (1.12 if child else 1.0)
    head_w = head_h * rng.uniform(0.72, 0.82)
    shoulder_w = 170 * s * rng.uniform(0.88, 1.12)
    hip_w = shoulder_w * rng.uniform(0.62, 0.75)
    torso = 185 * s * rng.uniform(0.92, 1.06)
    upper, fore = 105 * s, 98 * s
    thigh, shin = 70 * s, 120 * s

    lean = float(rng.normal(0, 6))
    if rng.random() < 0.15:
        lean += float(rng.choice([-1, 1]) * rng.uniform(12, 24))
    pts = np.zeros((K, 2))
    hip_mid = np.array([cx, head_y + head_h * 0.5 + 14 * s + torso])
    neck = hip_mid + _rot(np.array([0.0, -torso]), lean)
    pts[IDX["neck"]] = neck
    sh_dir = _rot(np.array([shoulder_w / 2, 0.0]), lean + rng.normal(0, 3))
    pts[IDX["left_shoulder"]] = neck + sh_dir + _rot(np.array([0, 12 * s]), lean)
    pts[IDX["right_shoulder"]] = neck - sh_dir + _rot(np.array([0, 12 * s]), lean)
    pts[IDX["left_hip"]] = hip_mid + np.array([hip_w / 2, 0])
    pts[IDX["right_hip"]] = hip_mid - np.array([hip_w / 2, 0])

    # Head: centre above the neck, rolled, yawed.
    roll = lean + float(rng.normal(0, 7))
    pose_sleep = rng.random() < 0.1
    if pose_sleep:
        roll += float(rng.choice([-1, 1]) * rng.uniform(18, 35))
    yaw = float(np.clip(rng.normal(0, 0.35), -0.95, 0.95))
    if rng.random() < 0.2:
        yaw = float(rng.choice([-1, 1]) * rng.uniform(0.55, 0.95))
    head_c = neck + _rot(np.array([0.0, -(head_h * 0.5 + 12 * s)]), roll * 0.6)
    pitch = rng.uniform(0.15, 0.3) * head_h if pose_sleep else rng.normal(0, 0.04) * head_h

    def face(dx: float, dy: float) -> np.ndarray:
        return head_c + _rot(np.array([dx * head_w, dy * head_h + pitch]), roll)

    eye_dx = 0.2
    pts[IDX["nose"]] = face(0.42 * yaw * 0.9, 0.08)
    pts[IDX["mouth"]] = face(0.36 * yaw * 0.9, 0.26)
    pts[IDX["left_eye"]] = face(eye_dx * math.cos(yaw * 1.2) + 0.35 * yaw, -0.06)
    pts[IDX["right_eye"]] = face(-eye_dx * math.cos(yaw * 1.2) + 0.35 * yaw, -0.06)
    pts[IDX["left_ear"]] = face(0.5 * math.cos(yaw * 1.4) + 0.05 * yaw, 0.02)
    pts[IDX["right_ear"]] = face(-0.5 * math.cos(yaw * 1.4) + 0.05 * yaw, 0.02)
    # The face region: skin drawn over any hair, holding eyes, nose and mouth; its top edge sits
    # 0.23 head heights above the head centre, above the eyes (-0.06), so hair never hides them.
    face_c = face(0.22 * yaw, 0.14)
    self_occ: set[int] = set()
    # Turned head: the far ear, then the far eye, hide behind the head itself.
    if yaw > 0.3:
        self_occ.add(IDX["right_ear"])
    if yaw < -0.3:
        self_occ.add(IDX["left_ear"])
    if yaw > 0.75:
        self_occ.add(IDX["right_eye"])
    if yaw < -0.75:
        self_occ.add(IDX["left_eye"])

    # Legs: seated, thighs towards the camera (foreshortened), shins down.
    for side, sign in (("left", 1), ("right", -1)):
        hip = pts[IDX[f"{side}_hip"]]
        knee = hip + np.array([sign * rng.uniform(2, 14) * s, thigh * rng.uniform(0.7, 1.2)])
        ankle = knee + np.array([sign * rng.uniform(-8, 14) * s, shin * rng.uniform(0.85, 1.1)])
        pts[IDX[f"{side}_knee"]] = knee
        pts[IDX[f"{side}_ankle"]] = ankle

    # Arms.
    choices = ["lap", "lap", "crossed", "raised", "phone", "reach_back", "window", "wave"]
    pose = "wheel" if (wheel is not None and rng.random() < 0.7) else str(rng.choice(choices))
    if pose_sleep:
        pose = "lap"
    behind_seat = {"left": False, "right": False}
    behind_torso = {"left": False, "right": False}
    one_side = "left" if rng.random() < 0.5 else "right"
    for side, sign in (("left", 1), ("right", -1)):
        sh = pts[IDX[f"{side}_shoulder"]]
        hip = pts[IDX[f"{side}_hip"]]
        jitter = rng.normal(0, 6 * s, size=2)
        p = pose
        if pose in ("phone", "reach_back", "window", "wave") and side != one_side:
            p = "lap"
        if p == "wheel" and wheel is not None:
            wcx, wcy, wrx, wry = wheel
            ang = math.radians(rng.uniform(-50, -10) if sign > 0 else rng.uniform(190, 230))
            wrist = np.array([wcx + wrx * math.cos(ang), wcy + wry * math.sin(ang)]) + jitter
        elif p == "lap":
            wrist = hip + np.array([-sign * rng.uniform(0, 35) * s, rng.uniform(10, 50) * s]) + jitter
        elif p == "crossed":
            other = pts[IDX["right_shoulder" if side == "left" else "left_shoulder"]]
            wrist = other + np.array([sign * 12 * s, rng.uniform(40, 70) * s]) + jitter
        elif p == "raised":
            wrist = sh + np.array([sign * rng.uniform(10, 60) * s, -rng.uniform(140, 195) * s]) + jitter
        elif p == "phone":
            ear = pts[IDX[f"{side}_ear"]]
            wrist = ear + np.array([sign * 6 * s, 14 * s]) + jitter
        elif p == "reach_back":
            wrist = sh + np.array([sign * rng.uniform(60, 110) * s, -rng.uniform(60, 140) * s]) + jitter
            behind_seat[side] = True
        elif p == "window":
            wrist = sh + np.array([sign * rng.uniform(110, 170) * s, -rng.uniform(0, 70) * s]) + jitter
        else:  # wave
            wrist = sh + np.array([sign * rng.uniform(90, 150) * s, -rng.uniform(100, 170) * s]) + jitter
        elbow = _elbow_between(sh, wrist, upper, fore, outward=sign)
        pts[IDX[f"{side}_wrist"]] = wrist
        pts[IDX[f"{side}_elbow"]] = elbow
        if p == "lap" and rng.random() < 0.25:
            behind_torso[side] = False
    # Crossed arms: one forearm passes over the other; pick which lies on top.
    pal = rng.integers(0, 255, size=3)
    shirt = tuple(int(v) for v in pal)
    trousers = tuple(int(v) for v in rng.integers(10, 120, size=3))
    skin = SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))]
    hair = HAIR_TONES[int(rng.integers(0, len(HAIR_TONES)))]
    if palette_ir:
        g = int(rng.integers(60, 200))
        shirt = (g, g, g)
    hat = tuple(int(v) for v in rng.integers(0, 255, size=3)) if rng.random() < 0.15 else None
    return Occupant(
        slot=slot, scale=s, points=pts, head_center=(float(head_c[0]), float(head_c[1] + pitch * 0.3)),
        head_axes=(head_w / 2, head_h / 2), face_center=(float(face_c[0]), float(face_c[1])), head_roll=roll, yaw=yaw, eyes_closed=pose_sleep,
        skin=skin, hair=hair, shirt=shirt, trousers=trousers, hair_style=int(rng.integers(0, 4)),
        hat=hat, arm_behind_seat=behind_seat, arm_behind_torso=behind_torso,
        self_occluded=self_occ, pose="sleep" if pose_sleep else pose, child=child,
    )
