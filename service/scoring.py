"""The default scoring function: how sure is the engine about one image's prediction?

``default_score(prediction, bundle) -> (score, reasons)``. Every check below yields a
component in [0, 1] (1 = no doubt); **the score is the smallest component** (the weakest part
of the prediction decides) and the reasons are the codes of the components below
``REASON_LEVEL`` (0.6), weakest first. With ``ramp(c, lo, hi) = clip((c - lo) / (hi - lo), 0, 1)``
and the bundle's thresholds (``det_conf``, ``person_conf``, per-point ``main``/``visible``):

- ``empty``: no heads and no persons -> the score is ``EMPTY_SCORE`` (0.3), nothing else runs.
- ``low_head_conf``: min over heads of ``ramp(conf, det_conf, SURE)``, SURE = 0.7.
- ``low_person_conf``: min over persons of ``ramp(conf, person_conf, SURE)``.
- ``kpt_near_threshold``: per point the certainty ``u = min(1, |c - t| / NEAR_MARGIN)``
  (NEAR_MARGIN = 0.15) for the main confidence against its threshold and, for points the main
  model claims in two-model bundles, the visible confidence against its threshold (the lower of
  the two). Per person ``1 - sum(1 - u) / KPT_DOUBT_BUDGET`` (4: four points sitting exactly on
  their thresholds make a person doubtful), min over persons.
- ``model_disagreement`` (two-model bundles only), min over persons of: ``UNMATCHED_SCORE``
  (0.3) for a person the visible-only model did not find at all; else
  ``1 - ramp(|conf - visible_match_conf|, 0.2, 0.6)`` (person confidences far apart) and
  ``1 - n / 3`` for n points the visible-only model sees (visible conf > its threshold) but the
  main model does not claim (main conf <= its threshold); visible points are a subset of all
  points, so each such point is a contradiction.
- ``head_without_person`` / ``person_without_head`` (bundles with a head model and a pose
  model): a head box that contains none of any person's claimed face points (box grown by 25 %),
  and a person with at least 2 claimed face points, fewer than half of them inside any head box.
  Each case multiplies its component by ``INCONSISTENT_SCORE`` (0.4).
- ``novel_appearance`` (bundles with an appearance profile, ``service.novelty``):
  ``1 - ramp(novelty, NOVEL_FAMILIAR, NOVEL_FAR)`` (1.0, 1.5): an image that looks like none of
  the training images (night IR for a daylight model, a new camera position) is doubtful however
  confident the models are; on such images they are often confidently wrong. Applies to empty
  images too.

``review_priority(prediction, bundle)`` orders images that go to review when not all of them
can (a review budget, a batch of fixed size): the expected amount of correction, i.e. the doubt
summed over the whole image instead of the weakest part: per person the key-point doubt
``sum(1 - u)`` plus ``1 - ramp(conf)`` plus, in two-model bundles, ``1 - agreement``; per head
``1 - ramp(conf)``; an empty image ``1 - EMPTY_SCORE``. An image with four doubtful people
outranks one with a single doubtful person although both score 0.
"""
from __future__ import annotations

import logging
from typing import Sequence

from .bundle import Bundle
from .record import Head, Person, Prediction

log = logging.getLogger(__name__)

REASON_LEVEL = 0.6
EMPTY_SCORE = 0.3
SURE = 0.7
NEAR_MARGIN = 0.15
RANK_MARGIN = 0.5  # image_doubt: a graded distance to the threshold, not a near/far cut
KPT_DOUBT_BUDGET = 4.0
UNMATCHED_SCORE = 0.3
CONTRADICTIONS_MAX = 3.0
INCONSISTENT_SCORE = 0.4
NOVEL_FAMILIAR = 1.0
NOVEL_FAR = 1.5
HEAD_GROW = 0.25
FACE_POINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "mouth")


def ramp(c: float, lo: float, hi: float) -> float:
    """0 at or below ``lo``, 1 at or above ``hi``, linear between."""
    if hi <= lo:
        return 1.0 if c >= hi else 0.0
    return min(max((c - lo) / (hi - lo), 0.0), 1.0)


def _per_point(values: Sequence[float], k: int) -> Sequence[float]:
    return values if len(values) == k else [values[0]] * k


def _keypoint_certainty(person: Person, main_thr: Sequence[float], vis_thr: Sequence[float], two_model: bool) -> float:
    doubt = sum(1.0 - u for u in _point_certainties(person, main_thr, vis_thr, two_model, NEAR_MARGIN))
    return max(0.0, 1.0 - doubt / KPT_DOUBT_BUDGET)


def _point_thresholds(prediction: Prediction, bundle: Bundle) -> tuple[Sequence[float], Sequence[float], bool]:
    """(per-point main thresholds, per-point visible thresholds, two-model bundle?) for the persons."""
    t = bundle.thresholds
    k = len(prediction.persons[0].keypoints)
    two_model = bundle.visibility_mode == "two_model" and "pose_visible" in bundle.models
    return _per_point(t.main, k), _per_point(t.visible, k), two_model


def _agreement(person: Person, main_thr: Sequence[float], vis_thr: Sequence[float]) -> float:
    if person.visible_match_conf <= 0.0:
        return UNMATCHED_SCORE
    apart = 1.0 - ramp(abs(person.conf - person.visible_match_conf), 0.2, 0.6)
    contradictions = sum(1 for kp, tm, tv in zip(person.keypoints, main_thr, vis_thr)
                         if kp.visible_conf > tv and kp.main_conf <= tm)
    return min(apart, max(0.0, 1.0 - contradictions / CONTRADICTIONS_MAX))


def _inside(x: float, y: float, head: Head) -> bool:
    x1, y1, x2, y2 = head.box
    gx, gy = HEAD_GROW * (x2 - x1), HEAD_GROW * (y2 - y1)
    return x1 - gx <= x <= x2 + gx and y1 - gy <= y <= y2 + gy


def _face_points(person: Person, names: Sequence[str]) -> list[tuple[float, float]]:
    return [(kp.x, kp.y) for n, kp in zip(names, person.keypoints) if n in FACE_POINTS and kp.visibility != "outside"]


def _consistency(prediction: Prediction, names: Sequence[str]) -> tuple[float, float]:
    """(head_without_person, person_without_head) components."""
    faces = [_face_points(p, names) for p in prediction.persons]
    lonely_heads = sum(1 for h in prediction.heads if not any(_inside(x, y, h) for f in faces for x, y in f))
    headless = 0
    for f in faces:
        if len(f) >= 2 and 2 * sum(1 for x, y in f if any(_inside(x, y, h) for h in prediction.heads)) < len(f):
            headless += 1
    return INCONSISTENT_SCORE ** lonely_heads, INCONSISTENT_SCORE ** headless


def score_components(prediction: Prediction, bundle: Bundle) -> dict[str, float]:
    """Every component (reason code -> value in [0, 1]) that applies to this prediction."""
    out: dict[str, float] = {}
    if prediction.novelty is not None:
        out["novel_appearance"] = _familiarity(prediction)
    if not prediction.heads and not prediction.persons:
        return {"empty": EMPTY_SCORE, **out}
    t = bundle.thresholds
    if prediction.heads:
        out["low_head_conf"] = min(ramp(h.conf, t.det_conf, SURE) for h in prediction.heads)
    if prediction.persons:
        main_thr, vis_thr, two_model = _point_thresholds(prediction, bundle)
        out["low_person_conf"] = min(ramp(p.conf, t.person_conf, SURE) for p in prediction.persons)
        out["kpt_near_threshold"] = min(_keypoint_certainty(p, main_thr, vis_thr, two_model)
                                        for p in prediction.persons)
        if two_model:
            out["model_disagreement"] = min(_agreement(p, main_thr, vis_thr) for p in prediction.persons)
    if "head" in bundle.models and "pose_main" in bundle.models:
        out["head_without_person"], out["person_without_head"] = _consistency(prediction, bundle.keypoints.names)
    return out


def total_doubt(prediction: Prediction, bundle: Bundle) -> float:
    """The total doubt over the score components, ``sum(1 - value)``: the judge's tie-break
    between images of equal score (on a weak bundle many images score 0; the one with more
    things wrong is the more doubtful), used by ``judge.review_share``'s ranking."""
    return float(sum(1.0 - v for v in score_components(prediction, bundle).values()))


def _familiarity(prediction: Prediction) -> float:
    """The ``novel_appearance`` component (1 without a novelty figure)."""
    if prediction.novelty is None:
        return 1.0
    return 1.0 - ramp(prediction.novelty, NOVEL_FAMILIAR, NOVEL_FAR)


def _doubt_items(prediction: Prediction, bundle: Bundle, margin: float) -> list[float]:
    """The doubt of every decision in a non-empty image: per head ``1 - ramp(conf)``; per person
    ``1 - ramp(conf)``, each key point's ``1 - u`` (``u`` at ``margin``) and, in two-model
    bundles, ``1 - agreement``; with a novelty figure, ``1 - novel_appearance``."""
    t = bundle.thresholds
    items = [1.0 - ramp(h.conf, t.det_conf, SURE) for h in prediction.heads]
    if prediction.novelty is not None:
        items.append(1.0 - _familiarity(prediction))
    if prediction.persons:
        main_thr, vis_thr, two_model = _point_thresholds(prediction, bundle)
        for p in prediction.persons:
            items.append(1.0 - ramp(p.conf, t.person_conf, SURE))
            items += [1.0 - u for u in _point_certainties(p, main_thr, vis_thr, two_model, margin)]
            if two_model:
                items.append(1.0 - _agreement(p, main_thr, vis_thr))
    return items


def review_priority(prediction: Prediction, bundle: Bundle) -> float:
    """Expected amount of correction in the image (>= 0, higher = review first); see the module docstring."""
    if not prediction.heads and not prediction.persons:
        return max(1.0 - EMPTY_SCORE, 1.0 - _familiarity(prediction))
    return float(sum(_doubt_items(prediction, bundle, NEAR_MARGIN)))


def image_doubt(prediction: Prediction, bundle: Bundle) -> float:
    """How unsure the engine is about the image as a whole, in [0, 1] (higher = more doubt).

    The mean over every decision in the image (each head and person confidence,
    ``1 - ramp(conf, threshold, SURE)``; each key point, ``1 - min(1, |c - t| / RANK_MARGIN)``
    for the main confidence and, for points the main model claims in two-model bundles, the
    larger of that and the visible-only doubt; each person's ``1 - agreement`` in two-model
    bundles). An empty image counts ``1 - EMPTY_SCORE``. Unlike ``default_score`` (the weakest
    part decides, right for *whether* an image needs a look) this grows when the models are
    unsure everywhere, as on a camera or lighting they were not trained for, and does not grow
    with the number of people, so it ranks the images a review round learns most from.
    """
    if not prediction.heads and not prediction.persons:
        return max(1.0 - EMPTY_SCORE, 1.0 - _familiarity(prediction))
    items = _doubt_items(prediction, bundle, RANK_MARGIN)
    return float(sum(items) / len(items))


def _point_certainties(person: Person, main_thr: Sequence[float], vis_thr: Sequence[float],
                       two_model: bool, margin: float) -> list[float]:
    """Per point ``u = min(1, |c - t| / margin)`` (the lower of main and visible for claimed
    points of two-model bundles)."""
    out = []
    for kp, tm, tv in zip(person.keypoints, main_thr, vis_thr):
        u = min(1.0, abs(kp.main_conf - tm) / margin)
        if two_model and kp.main_conf > tm:
            u = min(u, abs(kp.visible_conf - tv) / margin)
        out.append(u)
    return out


def default_score(prediction: Prediction, bundle: Bundle) -> tuple[float, list[str]]:
    """(score in [0, 1], reason codes weakest first); the formula is in the module docstring."""
    parts = score_components(prediction, bundle)
    score = min(parts.values(), default=1.0)
    reasons = [name for name, v in sorted(parts.items(), key=lambda kv: kv[1]) if v < REASON_LEVEL]
    return score, reasons
