"""Key-point schemas: names in order, flip pairs, skeleton and OKS sigmas.

The default cabin schema has 19 points: the 17 COCO points (so COCO-pretrained pose models
and COCO tooling line up index for index) plus ``mouth`` and ``neck``.
"""
from __future__ import annotations

from dataclasses import dataclass

COCO17_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# Official COCO key-point sigmas (pycocotools cocoeval.py).
COCO17_SIGMAS: tuple[float, ...] = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)
# COCO skeleton, 0-based.
COCO17_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
    (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

CABIN19_NAMES: tuple[str, ...] = COCO17_NAMES + ("mouth", "neck")
# mouth is as precise as the nose; the neck base is as loose as a shoulder.
CABIN19_SIGMAS: tuple[float, ...] = COCO17_SIGMAS + (0.026, 0.079)
CABIN19_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
    (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
    (0, 17), (17, 18), (18, 5), (18, 6),
)


def flip_index(names: tuple[str, ...] | list[str]) -> list[int]:
    """Index of each point's mirror image (left_x <-> right_x, others map to themselves)."""
    position = {n: i for i, n in enumerate(names)}
    out = []
    for n in names:
        if n.startswith("left_"):
            out.append(position.get("right_" + n[5:], position[n]))
        elif n.startswith("right_"):
            out.append(position.get("left_" + n[6:], position[n]))
        else:
            out.append(position[n])
    return out


@dataclass(frozen=True)
class KeypointSchema:
    """Names in order, flip pairs, skeleton (0-based index pairs) and OKS sigmas."""

    names: tuple[str, ...]
    sigmas: tuple[float, ...]
    skeleton: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sigmas):
            raise ValueError(
                f"keypoints: {len(self.names)} names but {len(self.sigmas)} sigmas; expected one sigma per name"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"keypoints: duplicate names in {list(self.names)}")
        for a, b in self.skeleton:
            if not (0 <= a < len(self.names) and 0 <= b < len(self.names)):
                raise ValueError(f"keypoints: skeleton edge ({a}, {b}) outside 0..{len(self.names) - 1}")
        if any(s <= 0 for s in self.sigmas):
            raise ValueError(f"keypoints: sigmas must be > 0, got {list(self.sigmas)}")

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def flip_idx(self) -> list[int]:
        return flip_index(self.names)

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "flip_idx": self.flip_idx,
            "skeleton": [list(e) for e in self.skeleton],
            "sigmas": list(self.sigmas),
        }

    @classmethod
    def from_json(cls, data: dict) -> "KeypointSchema":
        return cls(
            names=tuple(data["names"]),
            sigmas=tuple(float(s) for s in data["sigmas"]),
            skeleton=tuple((int(a), int(b)) for a, b in data.get("skeleton", [])),
        )

    @classmethod
    def for_names(cls, names: tuple[str, ...] | list[str]) -> "KeypointSchema":
        """Known schema for these names (COCO-17 or cabin-19); otherwise a uniform sigma."""
        names = tuple(names)
        if names == CABIN19_NAMES:
            return CABIN19
        if names == COCO17_NAMES:
            return COCO17
        return cls(names=names, sigmas=tuple([0.05] * len(names)), skeleton=())


CABIN19 = KeypointSchema(CABIN19_NAMES, CABIN19_SIGMAS, CABIN19_SKELETON)
COCO17 = KeypointSchema(COCO17_NAMES, COCO17_SIGMAS, COCO17_SKELETON)

# Visibility states and their COCO / YOLO flags.
VISIBLE, OCCLUDED, OUTSIDE = "visible", "occluded", "outside"
VISIBILITY_FLAG = {VISIBLE: 2, OCCLUDED: 1, OUTSIDE: 0}
FLAG_VISIBILITY = {v: k for k, v in VISIBILITY_FLAG.items()}
