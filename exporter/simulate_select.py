"""Selection strategies of the active-learning benchmark (``annotator simulate``).

A bundle scores the unlabelled pool once (``score_pool``, cached on disk per bundle id); each
strategy then picks ``n`` images from the candidates:

- ``judge``: the product's judgement. Images in order of ``service.scoring.default_score``
  (lowest = most doubtful first; ties broken by the total doubt over all score components, so
  that of two images scored 0 the one with more things wrong comes first), with the daemon's
  near-duplicate suppression (dHash within ``NearDuplicate``'s distance of a frame of the same
  camera already picked in this round, or reviewed in an earlier one, is skipped) and a
  per-round diversity cap: no camera
  takes more than ``CAMERA_SHARE`` of a round's picks while other cameras have doubtful images
  left (a review batch that is all one camera teaches the models one viewpoint).
- ``uncertainty``: the classic baseline, no diversity: the mean distance of the main key-point
  confidences to their thresholds over all predicted points (smallest first; an image with no
  person predicted counts as distance 0).
- ``random``: a seeded random sample.
- ``judge_audit``: the judge plus the product's random audit: the candidates whose seeded audit
  lottery (``service.judge.audit_draw(seed, image_id)``) is lowest fill ``audit_fraction`` of the
  round (exactly the images the daemon would audit first), the judge's ranking the rest.

- ``typiclust`` (an extra, not run by default): the low-budget rule of Hacohen et al., "Active
  learning on a budget" (ICML 2022), which ignores the model's doubt: the pool's images (reviewed
  and not) are clustered (k-means, ``len(reviewed) + n`` clusters) on a model-free embedding of
  each image (``pool_features``: a 16x16 colour thumbnail, PCA to 32 dimensions); each pick takes
  the cluster with the fewest reviewed images (the largest first among equals; clusters under 5
  images skipped while others are left) and, in it, the most *typical* unreviewed image (the
  inverse mean distance to its 20 nearest neighbours in the cluster). The literature's answer to
  the cold start, where uncertainty sampling trails random: typical and diverse picks first.
- ``typiclust_judge`` (an extra): ``typiclust``'s choice of cluster, and in it the image the judge
  doubts most (``judge_order``) instead of the most typical: coverage from the clusters, the pick
  from the product's judgement.
- ``judge_power`` (an extra): stochastic batch acquisition (Kirsch et al., "Stochastic batch
  acquisition: a simple baseline for deep active learning", TMLR 2023): instead of the judge's top
  of the ranking, a seeded sample without replacement with probability proportional to the
  image's total doubt (power sampling, exponent 1; Gumbel top-k), then the judge's diversity
  measures. Top-k picks of one batch pile onto the same kind of failure; a sample keeps the
  preference for doubt and spreads over its kinds.
- ``judge_middle`` (an extra): outlier rejection (Karamcheti et al., "Mind your outliers!",
  ACL 2021): the judge's ranking with its most doubtful ``MIDDLE_SKIP`` of the candidates moved to
  the end: the images the bundle is most lost on are often the ones a small model cannot learn
  yet (a person cut by the frame, heavy occlusion), and the next band of doubt is learnable.
- ``random_then_judge`` (an extra): a cold-start schedule: the first round's picks are random
  (the same draw as ``random``'s), every later round the judge's (``round_rule``).

The daemon's own streaming rules (extras, ``STREAMED``): the rules above rank the whole pool at
once, which a daemon judging images as they arrive cannot do. These replay its decisions over the
candidates in capture order (file name order: recording after recording), one decision per
image, until ``n`` reviews are sent; no audits:

- ``judge_fcfs``: the daemon with a review budget of ``n`` (``judge.hourly_budget``): every image
  under the bundle's score threshold that is not a near duplicate of a camera's last 64 review
  frames goes to review until the budget is spent, first come first served.
- ``judge_stream``: the daemon with ``judge.review_share`` (``service.judge.ReviewShare``, the
  default window): an image under the threshold and no near duplicate must also rank among the
  most doubtful share of the last images scored (ranked among such candidates, since session 35).
  The share is the smallest that sends ``n`` of them (what a user sets for the reviewers'
  capacity: about ``n`` / pool since session 35), found by bisection.
- ``judge_stream_session``: ``judge_stream`` with ``judge.reviews_per_session = 1``: a recording
  (the pool's capture sequence, as the capture tool declares it) sends its first admitted frame
  and no other, in this round or a later one (the daemon counts a session's reviews in its store);
  the frames of such recordings are no candidates for the share.

Reference lines (``ORACLES``, not run by default): rules no product can run, because they read
the pool's ground truth. They bound what any scoring function could gain on the benchmark:

- ``oracle_error``: the images where the previous bundle is most wrong: the share of each image's
  ground-truth key points whose visibility class it gets wrong at its operating thresholds (a
  point of a person no prediction matches at OKS >= 0.5 counts wrong, so it also measures missed
  and misplaced people), most wrong first, with the judge's diversity measures.
- ``oracle_shift``: the images of the shift (IR or the new camera, from the pool's
  tags) first, in seeded random order, with the judge's diversity measures: a perfect
  novelty detector.
- ``oracle_scene``: the judge's ranking with a perfect near-duplicate test: the pool's scene tags
  instead of dHashes (one frame per capture sequence until every scene is taken; a scene
  reviewed in an earlier round counts as taken). Bounds what a better near-duplicate test
  could give the judge. It is also the daemon's ``judge.reviews_per_session = 1`` where the
  capture tool declares its recordings (the pool's scene of an image is its recording), which
  is no oracle in the product: a declared session is metadata, not ground truth.

Image ids are the sha256 of the file bytes, as in the daemon's store.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

STRATEGIES = ("judge", "uncertainty", "random", "judge_audit")
# Not run by default: the judge ordering its review picks by ``service.scoring.review_priority``.
# ``judge_plain``: the judge's ranking without its diversity measures (ablation).
# ``judge_image``: images by ``service.scoring.image_doubt`` (most doubt first) with the judge's
# near-duplicate suppression and camera cap.
# ``ORACLES``: the reference lines above (they need the pool's ground truth).
ORACLES = ("oracle_error", "oracle_shift", "oracle_scene")
STREAMED = ("judge_stream", "judge_fcfs", "judge_stream_session")
EXTRA_STRATEGIES = ("judge_priority", "judge_plain", "judge_image", "typiclust", "typiclust_judge", "random_then_judge",
                    "judge_power", "judge_middle", *STREAMED, *ORACLES)
# Rules that pick on ``pool_features``, and rules that need no pool scores (see ``round_rule``).
NEEDS_FEATURES = ("typiclust", "typiclust_judge")
NEEDS_NO_SCORES = ("random", "typiclust")
# Extra strategies that rank by a PoolScore field, most doubt first.
DOUBT_RANKED = {"judge_priority": "priority", "judge_image": "image_doubt"}
CAMERA_SHARE = 0.5
MIDDLE_SKIP = 0.25  # judge_middle: share of the candidates, most doubtful first, moved to the end
CACHE_VERSION = 3
DEDUP_DISTANCE = 6  # bits, the daemon's NearDuplicate default


@dataclass(frozen=True)
class PoolScore:
    """What one bundle says about one pool image (all a strategy needs)."""

    file_name: str
    image_id: str  # sha256 of the file bytes
    camera: str
    score: float  # default_score, 0..1, low = doubtful
    doubt: float  # sum over score components of (1 - component)
    uncertainty: float  # mean |main conf - main threshold| over predicted points (0 without persons)
    dhash: int
    reasons: tuple[str, ...]
    priority: float = 0.0  # service.scoring.review_priority
    image_doubt: float = 0.0  # service.scoring.image_doubt


def file_id(path: Path) -> str:
    """The daemon's image id: sha256 of the bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pool_score(d: dict[str, Any]) -> PoolScore:
    """A ``PoolScore`` from its json form (``score_pool``'s cache)."""
    return PoolScore(**{**d, "reasons": tuple(d["reasons"])})


def near_duplicate(a: PoolScore, b: PoolScore, dedup_distance: int = DEDUP_DISTANCE) -> bool:
    """The judge's near-duplicate test: same camera, dHashes within ``dedup_distance`` bits."""
    return a.camera == b.camera and bin(a.dhash ^ b.dhash).count("1") <= dedup_distance


def score_pool(bundle_dir: Path, pool: dict[str, Any], images_dir: Path, cache: Path,
               batch: int = 8) -> dict[str, PoolScore]:
    """Score every pool image with the bundle (operating thresholds); cached in ``cache`` (json).

    ``pool`` is the pool's COCO dict (``images`` with ``file_name`` and ``tags``). Returns
    file name -> ``PoolScore``.
    """
    from service.bundle import load_bundle
    from service.judge import dhash
    from service.scoring import default_score, image_doubt, review_priority, total_doubt

    bundle = load_bundle(bundle_dir)
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("bundle_id") == bundle.id and data.get("version") == CACHE_VERSION:
            return {d["file_name"]: pool_score(d) for d in data["scores"]}
    main_thr = bundle.thresholds.main
    out: dict[str, PoolScore] = {}
    for im, dec, pred in _engine_pass(bundle, pool["images"], images_dir, batch):
        score, reasons = default_score(pred, bundle)
        dists = [abs(kp.main_conf - main_thr[min(i, len(main_thr) - 1)])
                 for p in pred.persons for i, kp in enumerate(p.keypoints)]
        out[im["file_name"]] = PoolScore(
            file_name=im["file_name"], image_id=file_id(images_dir / im["file_name"]),
            camera=str(im.get("tags", {}).get("camera", "unknown")), score=float(score),
            doubt=total_doubt(pred, bundle),
            uncertainty=float(np.mean(dists)) if dists else 0.0, dhash=dhash(dec.pixels),
            reasons=tuple(reasons), priority=review_priority(pred, bundle),
            image_doubt=image_doubt(pred, bundle))
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"bundle_id": bundle.id, "version": CACHE_VERSION, "scores": [asdict(s) for s in out.values()]}))
    tmp.replace(cache)
    log.info("scored %d pool images with bundle %s", len(out), bundle.id)
    return out


def _engine_pass(bundle: Any, infos: Sequence[dict[str, Any]], images_dir: Path,
                 batch: int = 8) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(COCO image info, decoded image, ``Prediction``) for every image, through the daemon's engine."""
    from service.engine import Engine
    from service.imageio import read_image

    engine = Engine(bundle, batch_size=batch)
    for start in range(0, len(infos), batch):
        chunk = infos[start:start + batch]
        decoded = [read_image(images_dir / im["file_name"]) for im in chunk]
        yield from zip(chunk, decoded, engine.predict(decoded))


def pool_predictions(bundle_dir: Path, pool: dict[str, Any], images_dir: Path, cache: Path) -> dict[str, dict[str, Any]]:
    """The bundle's record (``Prediction.to_json()``: persons, key points with visibility, heads)
    of every pool image: what the daemon stores for an image it auto-accepts, i.e. the auto label
    the product's merged dataset trains on. File name -> record; cached in ``cache`` per bundle id.
    """
    from service.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("bundle_id") == bundle.id:
            return data["records"]
    records = {im["file_name"]: pred.to_json() for im, _, pred in _engine_pass(bundle, pool["images"], images_dir)}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"bundle_id": bundle.id, "records": records}))
    tmp.replace(cache)
    log.info("auto labels: %d pool images labelled by bundle %s", len(records), bundle.id)
    return records


def pool_errors(bundle_dir: Path, pool: dict[str, Any], images_dir: Path, cache: Path) -> dict[str, float]:
    """``oracle_error``'s key: per pool image, the share of its ground-truth key points whose
    visibility class the bundle gets wrong at its operating thresholds (unmatched persons' points
    count wrong; an image without labelled persons counts 0). Cached in ``cache`` per bundle id.
    """
    from service.bundle import load_bundle

    from .calibrate import collect_visibility_samples, person_category
    from .evaluate import keypoint_mapping, predict_dataset

    bundle = load_bundle(bundle_dir)
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("bundle_id") == bundle.id:
            return {k: float(v) for k, v in data["errors"].items()}
    cat = person_category(pool)
    kpt_map = keypoint_mapping(bundle, cat["keypoints"])
    sigmas = [bundle.keypoints.sigmas[i] for i in kpt_map]
    preds = predict_dataset(bundle, pool, images_dir, progress=False, sheet_images=0)
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in pool["annotations"]:
        anns.setdefault(int(a["image_id"]), []).append(a)
    errors: dict[str, float] = {}
    for im in pool["images"]:  # one image's ground truth at a time (not the whole pool per image)
        one = {**pool, "images": [im], "annotations": anns.get(int(im["id"]), [])}
        s = collect_visibility_samples({im["id"]: preds.operating_view[int(im["id"])]}, one, sigmas=sigmas,
                                       kpt_map=kpt_map)
        errors[im["file_name"]] = float(np.mean(s.pred_flag != s.gt_flag)) if len(s.gt_flag) else 0.0
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"bundle_id": bundle.id, "errors": errors}))
    tmp.replace(cache)
    return errors


FEATURE_SIDE, FEATURE_DIMS = 16, 32


def pool_features(pool: dict[str, Any], images_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """``typiclust``'s embedding of every pool image, no model involved: the 16x16 colour
    thumbnail (area-averaged, in [0, 1]) projected on the pool's first 32 principal components.
    File name -> vector; cached in ``cache`` (json)."""
    import cv2

    from service.imageio import read_image

    names = [im["file_name"] for im in pool["images"]]
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("names") == names and data.get("side") == FEATURE_SIDE:
            return {n: np.asarray(v, dtype=np.float64) for n, v in zip(names, data["features"])}
    thumbs = np.stack([cv2.resize(np.ascontiguousarray(read_image(images_dir / n).pixels[..., :3]),
                                  (FEATURE_SIDE, FEATURE_SIDE), interpolation=cv2.INTER_AREA).reshape(-1)
                       for n in names]).astype(np.float64) / 255.0
    centred = thumbs - thumbs.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    feats = centred @ vt[:FEATURE_DIMS].T
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"names": names, "side": FEATURE_SIDE, "features": np.round(feats, 6).tolist()}))
    tmp.replace(cache)
    return dict(zip(names, feats))


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the cluster index of every row of ``x``."""
    k = max(1, min(k, len(x)))
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[rng.choice(len(x), p=probs)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(axis=1))
    c = np.stack(centres)
    labels = np.zeros(len(x), dtype=int)
    for it in range(iters):
        dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        new = dist.argmin(axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                c[j] = x[labels == j].mean(axis=0)
    return labels


def typiclust(candidates: Sequence[str], reviewed: Sequence[str], features: dict[str, np.ndarray], n: int,
              rng: np.random.Generator, neighbours: int = 20, min_cluster: int = 5,
              rank: dict[str, float] | None = None) -> list[str]:
    """``typiclust``'s ``n`` picks out of ``candidates`` (see the module doc). ``rank``: file name ->
    key (higher first) that picks within a cluster instead of the typicality (``typiclust_judge``)."""
    names = [*dict.fromkeys([*reviewed, *candidates])]
    x = np.stack([features[m] for m in names])
    labels = kmeans(x, len(reviewed) + n, rng)
    wanted = set(candidates)
    is_cand = np.array([m in wanted for m in names])
    covered = {j: int(((labels == j) & ~is_cand).sum()) for j in set(labels.tolist())}
    size = {j: int((labels == j).sum()) for j in covered}
    typicality = np.zeros(len(names))
    for j in covered:
        idx = np.flatnonzero(labels == j)
        d = np.sqrt(((x[idx, None, :] - x[None, idx, :]) ** 2).sum(axis=2))
        kk = min(neighbours, len(idx) - 1)
        near = np.sort(d, axis=1)[:, 1:kk + 1].mean(axis=1) if kk > 0 else np.zeros(len(idx))
        typicality[idx] = 1.0 / (near + 1e-9)
    picks: list[str] = []
    taken = np.zeros(len(names), dtype=bool)
    while len(picks) < min(n, int(is_cand.sum())):
        open_ = [j for j in covered if (is_cand & ~taken & (labels == j)).any()]
        big = [j for j in open_ if size[j] >= min_cluster] or open_
        j = min(big, key=lambda c: (covered[c], -size[c], c))
        idx = np.flatnonzero(is_cand & ~taken & (labels == j))
        key = typicality[idx] if rank is None else np.array([rank[names[i]] for i in idx])
        best = idx[np.argmax(key)]
        taken[best] = True
        covered[j] += 1
        picks.append(names[best])
    return picks


def round_rule(strategy: str, round_: int) -> str:
    """The rule a strategy picks with in round ``round_`` (1 = the first after the initial set):
    the strategy itself, except for schedules (``random_then_judge``: random, then the judge)."""
    if strategy == "random_then_judge":
        return "random" if round_ <= 1 else "judge"
    return strategy


def judge_order(scores: Sequence[PoolScore]) -> list[PoolScore]:
    """The judge's ranking (``service.judge.rank_key``: score ascending, then more total doubt
    first), then file name."""
    from service.judge import rank_key

    return sorted(scores, key=lambda s: (*rank_key(s.score, s.doubt), s.file_name))


def diverse_take(ranked: Sequence[PoolScore], n: int, camera_share: float = CAMERA_SHARE,
                 dedup_distance: int = DEDUP_DISTANCE, seen: Sequence[PoolScore] = (),
                 scene: dict[str, float] | None = None) -> list[PoolScore]:
    """Walk ``ranked`` and take ``n``: near-duplicates of a same-camera pick skipped, cameras capped.

    ``seen``: images reviewed in earlier rounds; a near-duplicate of one of them is skipped too
    (a frame of a capture sequence whose neighbour was already reviewed teaches little).
    The cap (``camera_share`` of ``n``) is lifted once every camera is capped or exhausted, and
    skipped near-duplicates come back last, so ``n`` images are returned when ``ranked`` has them.
    """
    def duplicate(a: PoolScore, b: PoolScore) -> bool:
        if scene is not None:  # oracle_scene: the pool's own scene tags, a perfect near-duplicate test
            return scene[a.file_name] == scene[b.file_name]
        return near_duplicate(a, b, dedup_distance)

    cap = max(1, int(np.ceil(camera_share * n)))
    picked: list[PoolScore] = []
    per_camera: dict[str, int] = {}
    deferred: list[PoolScore] = []
    for s in ranked:
        if len(picked) >= n:
            break
        if any(duplicate(p, s) for p in (*seen, *picked)):
            deferred.append(s)
            continue
        if per_camera.get(s.camera, 0) >= cap:
            deferred.append(s)
            continue
        picked.append(s)
        per_camera[s.camera] = per_camera.get(s.camera, 0) + 1
    chosen = {p.file_name for p in picked}
    for s in [*deferred, *ranked]:  # capped / duplicate images, in rank order, when nothing else is left
        if len(picked) >= n:
            break
        if s.file_name not in chosen:
            picked.append(s)
            chosen.add(s.file_name)
    return picked


def stream_take(pool: Sequence[PoolScore], n: int, threshold: float, seen: Sequence[PoolScore] = (),
                share: float | None = None, session: dict[str, float] | None = None) -> list[PoolScore]:
    """The daemon's review decisions over ``pool`` in capture order (file name), the first ``n``.

    Each image: review when its score is under ``threshold``, it is no near duplicate of its
    camera's last review frames (the daemon's ``NearDuplicate`` with its default memory;
    ``seen``, the images reviewed before, fill that memory first, as the daemon recalls it from
    its store), with ``session`` (file name -> recording) its recording has sent no review yet
    (``judge.reviews_per_session = 1``; ``seen`` count), and with ``share`` it ranks within the
    share of the ``ReviewShare`` window, where every image counts and those three tests' passers
    are ranked (the daemon's ``Judge.judge``).
    """
    from service.judge import REVIEW_WINDOW, NearDuplicate, ReviewShare, rank_key

    window = ReviewShare(share, REVIEW_WINDOW) if share is not None else None
    recent = NearDuplicate(DEDUP_DISTANCE)
    for s in seen:
        recent.remember_hash(s.camera, s.dhash)
    taken = {session[s.file_name] for s in seen if s.file_name in session} if session is not None else set()
    picks: list[PoolScore] = []
    for s in sorted(pool, key=lambda s: s.file_name):
        if len(picks) >= n:
            break
        candidate = s.score < threshold and not recent.is_near(s.camera, s.dhash) \
            and (session is None or session[s.file_name] not in taken)
        admitted = window.admit(rank_key(s.score, s.doubt), candidate) if window is not None else candidate
        if not admitted:  # the window counts every image; only candidates are admitted
            continue
        if session is not None:
            taken.add(session[s.file_name])
        picks.append(s)
        recent.remember_hash(s.camera, s.dhash)
    return picks


def stream_share_take(pool: Sequence[PoolScore], n: int, threshold: float, seen: Sequence[PoolScore] = (),
                      session: dict[str, float] | None = None) -> tuple[float, list[PoolScore]]:
    """``judge_stream``: the smallest share (by bisection, to 0.001) whose ``stream_take`` sends
    ``n`` reviews, and those reviews."""
    lo, hi = 0.0, 1.0
    best = stream_take(pool, n, threshold, seen, hi, session)
    while hi - lo > 0.001:
        mid = (lo + hi) / 2
        picks = stream_take(pool, n, threshold, seen, mid, session)
        if len(picks) >= n:
            hi, best = mid, picks
        else:
            lo = mid
    return hi, best


def audit_picks(scores: Sequence[PoolScore], n: int, seed: int) -> list[PoolScore]:
    """The ``n`` candidates with the lowest seeded audit lottery draw (the daemon's audit order)."""
    from service.judge import audit_draw

    return sorted(scores, key=lambda s: audit_draw(seed, s.image_id))[:n]


def select(strategy: str, candidates: Sequence[str], scores: dict[str, PoolScore] | None, n: int,
           rng: np.random.Generator, seed: int, audit_fraction: float,
           oracle: dict[str, float] | None = None, reviewed: Sequence[str] = (),
           features: dict[str, np.ndarray] | None = None, threshold: float = 0.5) -> list[str]:
    """File names of the ``n`` images ``strategy`` sends to review out of ``candidates``.

    ``threshold``: the scoring bundle's score threshold (``STREAMED`` rules).

    ``oracle``: file name -> key (higher = picked first) for the ``ORACLES`` strategies; the
    recording of each pool image for ``oracle_scene`` and ``judge_stream_session``.
    ``reviewed``: images already reviewed; the judge's diversity measures skip their near duplicates.
    ``features``: ``pool_features``, for ``typiclust`` and ``typiclust_judge``.
    """
    n = min(n, len(candidates))
    if strategy == "random":
        return [candidates[i] for i in rng.permutation(len(candidates))[:n]]
    if strategy in NEEDS_FEATURES and features is None:
        raise ValueError(f"strategy {strategy!r} needs the pool's features")
    if strategy == "typiclust":
        return typiclust(candidates, reviewed, features, n, rng)
    if scores is None:
        raise ValueError(f"strategy {strategy!r} needs pool scores")
    pool = [scores[c] for c in candidates]
    if strategy == "typiclust_judge":
        order = judge_order(pool)
        return typiclust(candidates, reviewed, features, n, rng,
                         rank={s.file_name: float(len(order) - i) for i, s in enumerate(order)})
    seen = [scores[r] for r in reviewed if r in scores]

    def take(ranked: Sequence[PoolScore], k: int) -> list[PoolScore]:
        return diverse_take(ranked, k, seen=seen, scene=oracle if strategy == "oracle_scene" else None)

    if strategy in ORACLES:
        if oracle is None:
            raise ValueError(f"strategy {strategy!r} needs the oracle's key per pool image")
        if strategy == "oracle_scene":  # the judge's ranking; the oracle knows the scenes
            return [s.file_name for s in take(judge_order(pool), n)]
        # Ties: oracle_shift's (every shifted image has key 1) in seeded random order, oracle_error's
        # by file name.
        base = [pool[i] for i in rng.permutation(len(pool))] if strategy == "oracle_shift" \
            else sorted(pool, key=lambda s: s.file_name)
        ranked = sorted(base, key=lambda s: -oracle[s.file_name])
        return [s.file_name for s in take(ranked, n)]
    if strategy == "judge_fcfs":
        return [s.file_name for s in stream_take(pool, n, threshold, seen)]
    if strategy in ("judge_stream", "judge_stream_session"):
        if strategy == "judge_stream_session" and oracle is None:
            raise ValueError(f"strategy {strategy!r} needs the pool's recordings")
        share, picks = stream_share_take(pool, n, threshold, seen, oracle if strategy == "judge_stream_session" else None)
        log.info("%s: review share %.3f sends %d", strategy, share, len(picks))
        return [s.file_name for s in picks]
    if strategy == "uncertainty":
        return [s.file_name for s in sorted(pool, key=lambda s: (s.uncertainty, s.file_name))[:n]]
    if strategy == "judge":
        return [s.file_name for s in take(judge_order(pool), n)]
    if strategy == "judge_power":  # Gumbel top-k: a sample without replacement, p ~ total doubt
        keys = np.log(np.array([s.doubt for s in pool]) + 1e-6) + rng.gumbel(size=len(pool))
        return [s.file_name for s in take([pool[i] for i in np.argsort(-keys, kind="stable")], n)]
    if strategy == "judge_middle":
        order = judge_order(pool)
        skip = int(MIDDLE_SKIP * len(order))
        return [s.file_name for s in take([*order[skip:], *order[:skip]], n)]
    if strategy == "judge_plain":
        return [s.file_name for s in judge_order(pool)[:n]]
    if strategy in DOUBT_RANKED:  # most doubt first, with the judge's diversity measures
        attr = DOUBT_RANKED[strategy]
        ranked = sorted(pool, key=lambda s: (-getattr(s, attr), s.score, s.file_name))
        return [s.file_name for s in take(ranked, n)]
    if strategy == "judge_audit":
        n_audit = min(n, max(1, int(round(audit_fraction * n)))) if audit_fraction > 0 else 0
        audit = audit_picks(pool, n_audit, seed)
        taken = {s.file_name for s in audit}
        rest = take(judge_order([s for s in pool if s.file_name not in taken]), n - n_audit)
        return [s.file_name for s in audit] + [s.file_name for s in rest]
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


