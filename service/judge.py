"""Judgement: score a prediction, then decide auto-accept or review (with audits, budgets, dedup).

A scoring function (``ScoreFn``) maps ``(Prediction, Bundle)`` to ``(score, reasons)``: a
confidence-like score in [0, 1] (low = doubtful) and reason codes. ``Judge`` turns the score
into a decision:

1. ``score < threshold`` -> review;
2. otherwise a seeded audit pick: ``sha256(f"{seed}:{image_id}")`` read as a number in [0, 1)
   below ``audit_fraction`` -> review with ``audit=True`` (same seed and id, same pick);
3. a review is dropped to auto_accepted with reason ``near_duplicate`` when the frame looks like
   one of the recent frames of the same camera that were sent to review (``NearDuplicate``), with
   reason ``session_reviewed`` when its recording (the capture session the image declares:
   ``service.store.sequence_of``) already sent ``session_budget`` frames to review, and with
   reason ``over_budget`` when the hourly or daily review budget (UTC windows, counted in the
   store, so they survive restarts) is spent.

With ``judge.review_share`` (``ReviewShare``) a doubtful image must also be among the most
doubtful ``share`` of the recent stream, ranked among the doubtful images that could still be
sent (not held back as near duplicates or by the recording cap): after those two holds and
before the budgets, an image that is not is auto-accepted with reason ``outranked`` (audits are
exempt). A threshold alone cannot say "the most doubtful
5 %": on a weak bundle most images score 0 (on the benchmark's first bundles 88-98 % of the pool
is below the default threshold of 0.5 and 25-50 % scores exactly 0), and a budget alone spends
itself on whatever arrives first (the first recordings of the hour). The share ranks each image
against the last ``window`` images the judge scored, by score and then by the total doubt of its
score components (``rank_key``; the order of ``annotator simulate``'s judge), in one pass, as
the images stream in (a streaming quantile, no image waits for its decision).

The per-session cap is for recordings whose reviewed label ``dataset export --propagate``
carries to the rest of the recording: one reviewed frame then labels the whole session, and a
second review of it teaches less than a first review of another (measured in
``docs/simulate/propagate/``). It is a budget like the hourly one, with one store counter per
session (``review:session:["camera", "session"]``). An audit pick spends it too: the audited
frame is its recording's review.

Budgets are consumed atomically with completion: a review verdict carries the names of the
budget counters (``Judgement.counters``) and ``Store.complete``/``complete_many`` adds one to
each in the very transaction that stores the decision, so a crash between judging and
completing spends nothing. Until then the judge holds an in-memory reservation, so verdicts of
one process never overspend a budget; ``Judge.settle`` drops the reservation once the
completion committed (or failed). Several processes judging against one store could each admit
one review over a nearly spent budget at the same moment (the check is not in the completing
transaction); one daemon per store is the supported set-up.

A review frame's dHash enters the near-duplicate memory when it is judged (so that a near
duplicate later in the same batch is held back already), and ``settle`` takes it out again when
the completion did not commit. An image is never a near duplicate of itself: the retry of an
image judged before (after a failed completion, or by the worker that took over its expired
lease) is judged afresh instead of being waved through by its own frame.

The default scoring formula lives in ``service.scoring``.
"""
from __future__ import annotations

import bisect
import collections
import hashlib
import importlib
import inspect
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .bundle import Bundle, Thresholds
from .config import REVIEW_WINDOW  # images a ReviewShare ranks against (judge.review_window)
from .errors import ConfigError
from .keypoints import COCO17
from .record import Prediction
from .scoring import default_score, total_doubt
from .store import Store

log = logging.getLogger(__name__)

ScoreFn = Callable[[Prediction, Bundle], "tuple[float, list[str]]"]
DECISIONS = ("auto_accepted", "review")
MAX_CAMERAS = 1024  # cameras a NearDuplicate remembers frames of (the least recently used go first)

__all__ = ["DECISIONS", "MAX_CAMERAS", "REVIEW_WINDOW", "Judge", "Judgement", "NearDuplicate", "ReviewShare", "ScoreFn",
           "default_score", "load_score_fn", "rank_key", "session_counter"]


@dataclass(frozen=True)
class Judgement:
    """The verdict on one image. ``decision`` is "auto_accepted" or "review"."""

    score: float
    reasons: tuple[str, ...]
    decision: str
    audit: bool
    counters: tuple[str, ...] = ()  # budget counters the completion must add one to (not in to_json)
    doubt: float | None = None  # the ranking's tie-break (total_doubt), with judge.review_share only
    remembered: tuple[str, int, str] | None = None  # (camera, dHash, image id) this review put in NearDuplicate

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"Judgement.decision: expected one of {DECISIONS}, got {self.decision!r}")
        if not (0.0 <= self.score <= 1.0):
            raise ValueError(f"Judgement.score: expected a number in [0, 1], got {self.score!r}")

    def to_json(self) -> dict:
        out = {"score": round(self.score, 4), "reasons": list(self.reasons), "decision": self.decision,
               "audit": self.audit}
        if self.doubt is not None:
            out["doubt"] = round(self.doubt, 4)
        return out


def dhash(pixels: np.ndarray) -> int:
    """64-bit difference hash: 9x8 grayscale thumbnail, one bit per left-vs-right neighbour pair.

    ``pixels``: HxW gray or HxWx3 BGR, any dtype OpenCV can resize (uint8 typically).
    """
    gray = pixels if pixels.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int32)
    bits = (small[:, 1:] > small[:, :-1]).reshape(-1)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


class NearDuplicate:
    """Remembers, per camera, the dHashes of the last ``memory`` frames sent to review.

    Each dHash is kept with the image id it came from (when given), and a frame is never compared
    with its own entries: the same image judged again (a retry after a failed completion, or by
    the worker that took over an expired lease) is not a near duplicate of itself.

    A frame whose dHash is within ``max_distance`` bits (Hamming, out of 64) of any of them is a
    near duplicate: a capture tool writes sequences of nearly the same frame, and once one of a
    sequence went to review its neighbours teach the models little (the benchmark's capture
    sequences: frames of one scene are within 0-9 bits of each other, other scenes of the same
    camera 13 or more). Kept in memory; the daemon keeps one across bundle swaps and fills it
    at start from the store's newest review frames (``Daemon._recall_reviews``). Thread-safe.

    At most ``max_cameras`` cameras are remembered; the one judged or remembered least recently
    is forgotten first. Camera names come from the first folder of a drop-folder path, and where
    that is a date or a session every day brings new "cameras": without a cap their frames
    (about 13 KB per camera with 64 frames) were kept for the daemon's life.
    """

    def __init__(self, max_distance: int = 6, memory: int = 64, max_cameras: int = MAX_CAMERAS) -> None:
        if not 0 <= max_distance <= 64:
            raise ValueError(f"max_distance: expected 0..64 bits, got {max_distance}")
        if memory < 1:
            raise ValueError(f"memory: expected at least 1 frame per camera, got {memory}")
        if max_cameras < 1:
            raise ValueError(f"max_cameras: expected at least 1 camera, got {max_cameras}")
        self.max_distance, self.memory, self.max_cameras = max_distance, memory, max_cameras
        # camera -> its frames as (image id, dHash); least recently used camera first
        self._recent: collections.OrderedDict[str, collections.deque[tuple[str | None, int]]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def distance(self, camera: str, pixels: np.ndarray) -> int | None:
        """Hamming distance to the nearest remembered review frame of the camera (None: none yet)."""
        return self.hash_distance(camera, dhash(pixels))

    def hash_distance(self, camera: str, h: int, image_id: str | None = None) -> int | None:
        """``distance`` for a frame whose dHash is already known."""
        with self._lock:
            frames = self._recent.get(camera)
            if frames is not None:
                self._recent.move_to_end(camera)
            recent = tuple(frames or ())
        return min((bin(r ^ h).count("1") for i, r in recent if i is None or i != image_id), default=None)

    def is_duplicate(self, camera: str, pixels: np.ndarray) -> bool:
        return self.is_near(camera, dhash(pixels))

    def is_near(self, camera: str, h: int, image_id: str | None = None) -> bool:
        """``is_duplicate`` for a frame whose dHash is already known."""
        d = self.hash_distance(camera, h, image_id)
        return d is not None and d <= self.max_distance

    def remember(self, camera: str, pixels: np.ndarray, image_id: str | None = None) -> None:
        self.remember_hash(camera, dhash(pixels), image_id)

    def remember_hash(self, camera: str, h: int, image_id: str | None = None) -> None:
        with self._lock:
            self._recent.setdefault(camera, collections.deque(maxlen=self.memory)).append((image_id, h))
            self._recent.move_to_end(camera)
            while len(self._recent) > self.max_cameras:
                self._recent.popitem(last=False)

    def forget_hash(self, camera: str, h: int, image_id: str | None = None) -> None:
        """Take back one ``remember_hash(camera, h, image_id)`` (a review that never committed);
        nothing when it is not there any more (pushed out by newer frames)."""
        with self._lock:
            recent = self._recent.get(camera)
            if recent is not None and (image_id, h) in recent:
                recent.remove((image_id, h))

    def cameras(self) -> list[str]:
        """The cameras remembered, least recently used first."""
        with self._lock:
            return list(self._recent)


def rank_key(score: float, doubt: float) -> tuple[float, float]:
    """The judge's order of doubt (lower first): the score, then more total doubt first."""
    return (round(float(score), 6), -float(doubt))


class ReviewShare:
    """The most doubtful ``share`` of a stream: a rolling window of the last ``window`` rank keys.

    Every scored image enters the window; the *candidates* among them (doubtful images that the
    judge could still send: under the threshold, no near duplicate of a review frame, their
    recording's review cap not reached) are ranked. ``admit(key, candidate)`` adds the key and
    says whether it is a candidate and fewer than ``share`` x (images in the window) candidates
    rank before it (``rank_key``: lower = more doubtful). So about ``share`` of the arriving
    images go to review, the most doubtful of those that can go, whatever the near-duplicate
    test and the recording cap hold back (ranked among every image instead, as until session 35,
    a share of 0.05 sent 2.2-3.6 % of the benchmark's first pools, and 1.8-2.5 % with one review
    per recording: the held-back frames took the first ranks; now 4.3-6.8 % and 4.5-5.8 %). On
    a stream whose mix does not drift faster than the window turns over, the share holds; the
    first keys after a start or a bundle swap rank against fewer (the daemon refills the window
    from the store's images of the same bundle: ``remember``): each new most doubtful image of a
    filling window goes, so a share of 0.05 sends about 8 of the first 100 images where 5 are due
    and 54 of the first 1000. A seeded draw in [0, 1) added to the rank makes the share exact
    from the first image, but it sends some of those most doubtful images by chance only; on the
    benchmark, where each round's new bundle starts with an empty window, it picked no better
    (session 37, ``docs/simulate/README.md``), so the ranks decide alone. Keys of different
    bundles are not comparable, so each judge has its own. Thread-safe.
    """

    def __init__(self, share: float, window: int = REVIEW_WINDOW) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share: expected a number in (0, 1], got {share}")
        if window < 1:
            raise ValueError(f"window: expected at least 1 image, got {window}")
        self.share, self.window = share, window
        self._fifo: collections.deque[tuple[tuple[float, float], bool]] = collections.deque()
        self._ranked: list[tuple[float, float]] = []  # the candidates' keys in the window, sorted
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fifo)

    def _add(self, key: tuple[float, float], candidate: bool) -> None:
        if candidate:
            bisect.insort(self._ranked, key)
        self._fifo.append((key, candidate))
        if len(self._fifo) > self.window:
            old, was = self._fifo.popleft()
            if was:
                del self._ranked[bisect.bisect_left(self._ranked, old)]

    def remember(self, key: tuple[float, float], candidate: bool = True) -> None:
        """Add a key without a decision (the store's earlier images, oldest first)."""
        with self._lock:
            self._add(key, candidate)

    def admit(self, key: tuple[float, float], candidate: bool = True) -> bool:
        with self._lock:
            self._add(key, candidate)
            return candidate and bisect.bisect_left(self._ranked, key) < self.share * len(self._fifo)


def session_counter(camera: str, session: str) -> str:
    """The store counter of the reviews of one recording."""
    return "review:session:" + json.dumps([camera, session])


def audit_draw(seed: int, image_id: str) -> float:
    """A reproducible number in [0, 1) for this seed and image: the audit lottery."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Judge:
    """Score, then decide; see the module docstring for the order of the rules.

    ``hourly_budget``/``daily_budget``: most reviews per UTC hour / day (None = unlimited),
    counted in ``store`` counters ``review:hour:YYYYmmddHH`` and ``review:day:YYYYmmdd``.
    ``session_budget``: most reviews per recording (camera and declared session; None = no
    limit), counted in ``review:session:...`` counters. ``clock`` defaults to the store's clock
    (epoch seconds). ``share``: a ``ReviewShare`` (None = every doubtful image goes on);
    ``doubt_fn`` its tie-break, by default ``total_doubt`` for the default scoring function and
    none (score alone) for a plugged-in one.
    """

    def __init__(self, score_fn: ScoreFn, threshold: float, audit_fraction: float, seed: int, store: Store,
                 hourly_budget: int | None = None, daily_budget: int | None = None,
                 dedup: NearDuplicate | None = None, clock: Callable[[], float] | None = None,
                 session_budget: int | None = None, share: ReviewShare | None = None,
                 doubt_fn: Callable[[Prediction, Bundle], float] | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in [0, 1], got {threshold}")
        if not 0.0 <= audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction: expected a number in [0, 1], got {audit_fraction}")
        self.score_fn = score_fn
        self.threshold = threshold
        self.audit_fraction = audit_fraction
        self.seed = seed
        self.store = store
        self.hourly_budget = hourly_budget
        self.daily_budget = daily_budget
        if session_budget is not None and session_budget < 1:
            raise ValueError(f"session_budget: expected at least 1 review per session (or None), got {session_budget}")
        self.session_budget = session_budget
        self.dedup = dedup
        self.share = share
        self.doubt_fn = doubt_fn if doubt_fn is not None else (total_doubt if score_fn is default_score
                                                               else (lambda prediction, bundle: 0.0))
        self.clock = clock if clock is not None else store.clock
        self._pending: dict[str, int] = {}  # budget counter -> reviews judged but not yet completed
        self._lock = threading.Lock()

    def score(self, prediction: Prediction, bundle: Bundle) -> tuple[float, list[str]]:
        """The scoring function's answer, made safe: NaN -> 0 ("bad_score"), clipped to [0, 1]."""
        score, reasons = self.score_fn(prediction, bundle)
        reasons = [str(r) for r in reasons]
        score = float(score)
        if not math.isfinite(score):
            log.warning("scoring function returned %r; treating it as 0", score)
            return 0.0, [*reasons, "bad_score"]
        return min(max(score, 0.0), 1.0), reasons

    def _session_spent(self, session: tuple[str, str] | None) -> bool:
        """Whether the recording has sent its ``session_budget`` reviews (reservations included)."""
        if session is None or self.session_budget is None:
            return False
        with self._lock:
            return self._spent(session_counter(*session), self.session_budget)

    def _spent(self, key: str, limit: int) -> bool:
        """Whether budget counter ``key`` has reached ``limit``, reservations included (hold ``_lock``)."""
        return self.store.counter(key) + self._pending.get(key, 0) >= limit

    def _reserve_budget(self, session: tuple[str, str] | None = None) -> tuple[tuple[str, ...], str | None]:
        """Reserve one review in each budget (the session's first): (the counter names, None), or
        ((), the reason code) when one is spent."""
        now = time.gmtime(self.clock())
        windows = [(time.strftime("review:hour:%Y%m%d%H", now), self.hourly_budget, "over_budget"),
                   (time.strftime("review:day:%Y%m%d", now), self.daily_budget, "over_budget")]
        if session is not None:
            windows.insert(0, (session_counter(*session), self.session_budget, "session_reviewed"))
        with self._lock:
            keys = []
            for key, limit, reason in windows:
                if limit is None:
                    continue
                if self._spent(key, limit):
                    return (), reason
                keys.append(key)
            for key in keys:
                self._pending[key] = self._pending.get(key, 0) + 1
        return tuple(keys), None

    def settle(self, judgement: Judgement, committed: bool = True) -> None:
        """Drop the reservation of ``judgement`` once its completion committed (or will not).

        ``committed=False`` (the completion failed, or the lease was lost to another worker) also
        takes its frame out of the near-duplicate memory: a review that never happened must not
        hold back the frames that follow it (the image's own retry is exempt anyway).
        """
        if not committed and judgement.remembered is not None and self.dedup is not None:
            self.dedup.forget_hash(*judgement.remembered)
        if not judgement.counters:
            return
        with self._lock:
            for key in judgement.counters:
                left = self._pending.get(key, 0) - 1
                if left > 0:
                    self._pending[key] = left
                else:
                    self._pending.pop(key, None)

    def judge(self, image_id: str, prediction: Prediction, bundle: Bundle, camera: str | None = None,
              pixels: np.ndarray | None = None, session: tuple[str, str] | None = None) -> Judgement:
        """Decide for one image. ``pixels`` (HxWx3 BGR, any size) feeds near-duplicate checks;
        ``session`` ((camera, session) of its recording, ``sequence_of``) the per-session cap.

        A review verdict within budgets reserves them: pass ``verdict.counters`` to
        ``Store.complete`` and call ``settle(verdict, committed)`` afterwards.
        """
        score, reasons = self.score(prediction, bundle)
        doubt = float(self.doubt_fn(prediction, bundle)) if self.share is not None else None
        audit = False
        if score >= self.threshold:
            if audit_draw(self.seed, image_id) >= self.audit_fraction:
                if self.share is not None:  # every scored image counts in the share, confident ones too
                    self.share.admit(rank_key(score, doubt), candidate=False)  # type: ignore[arg-type]
                return Judgement(score, tuple(reasons), "auto_accepted", False, doubt=doubt)
            audit = True
            reasons.append("audit")
        elif not reasons:
            reasons.append("low_score")
        use_dedup = self.dedup is not None and camera is not None and pixels is not None
        frame_hash = dhash(pixels) if use_dedup else 0  # type: ignore[arg-type]
        held = "near_duplicate" if use_dedup and self.dedup.is_near(camera, frame_hash, image_id) \
            else ("session_reviewed" if self._session_spent(session) else None)  # type: ignore[union-attr, arg-type]
        if self.share is not None:  # audits are exempt; held-back frames do not take a rank
            candidate = not audit and held is None
            if not self.share.admit(rank_key(score, doubt), candidate) and candidate:  # type: ignore[arg-type]
                return Judgement(score, (*reasons, "outranked"), "auto_accepted", False, doubt=doubt)
        if held is not None:
            return Judgement(score, (*reasons, held), "auto_accepted", audit, doubt=doubt)
        counters, spent = self._reserve_budget(session)
        if spent is not None:
            return Judgement(score, (*reasons, spent), "auto_accepted", audit, doubt=doubt)
        remembered = None
        if use_dedup:  # now, so that a near duplicate later in the same batch is held back
            self.dedup.remember_hash(camera, frame_hash, image_id)  # type: ignore[union-attr, arg-type]
            remembered = (camera, frame_hash, image_id)
        return Judgement(score, tuple(reasons), "review", audit, counters, doubt=doubt,
                         remembered=remembered)  # type: ignore[arg-type]


def _dry_run_bundle() -> Bundle:
    return Bundle(path=Path("."), id="dry-run", created="", models={}, keypoints=COCO17,
                  thresholds=Thresholds.from_json({}, COCO17.count))


def load_score_fn(spec: str, bundle: Bundle | None = None) -> ScoreFn:
    """Import ``"package.module:function"`` (or ``"default"``) and check it before use.

    Checks: importable, callable, accepts two positional arguments, and a dry run on an empty
    ``Prediction`` (with ``bundle``, or a COCO-17 stand-in) returns (float in [0, 1], list of
    str). Raises ``ConfigError`` naming ``judge.score_fn`` and what is wrong.
    """
    if spec in ("", "default"):
        return default_score
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"judge.score_fn: expected 'package.module:function' or 'default', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"judge.score_fn: cannot import module {module_name!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"judge.score_fn: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"judge.score_fn: {spec!r} is not callable (it is a {type(fn).__name__})")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError as exc:
        raise ConfigError(f"judge.score_fn: {spec!r} must accept (prediction, bundle): {exc}") from exc
    except ValueError:
        pass  # no signature available (some builtins); the dry run decides
    try:
        result = fn(Prediction(width=1, height=1), bundle or _dry_run_bundle())
    except Exception as exc:  # any failure of user code is a configuration problem here
        raise ConfigError(f"judge.score_fn: {spec!r} failed on an empty prediction: {exc!r}") from exc
    ok = isinstance(result, (tuple, list)) and len(result) == 2
    score, reasons = result if ok else (None, None)
    if not ok or isinstance(score, bool) or not isinstance(score, (int, float, np.floating)) \
            or not 0.0 <= float(score) <= 1.0:
        raise ConfigError(f"judge.score_fn: {spec!r} must return (score in [0, 1], list of str), "
                          f"got {result!r} for an empty prediction")
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) for r in reasons):
        raise ConfigError(f"judge.score_fn: {spec!r} must return reasons as a list of str, got {reasons!r}")
    return fn
