"""Merge reviewed labels into the dataset, and auto-accepted labels beside them.

``Merger.merge(labels)`` takes ``sync.review.ReviewedLabel``-shaped objects (image_id, heads,
persons with key points x, y, visibility in original pixels, backend, job or project id,
reviewer id, reviewed_at, adjusted) and for each one:

1. reads the image's row from the daemon's store; only ``uploaded`` images (or ``reviewed``
   ones, for a repeated or newer review) are merged, anything else is reported as skipped;
2. converts both the auto label (the stored record) and the reviewed label into the dataset's
   canonical form, mapping key points by name to the dataset's schema;
3. computes the image's mistakenness (``sync.mistakenness``) and stores the reviewed label in
   place of the auto one, with provenance (backend, job, reviewer, time, the bundle that
   pre-labelled it, adjusted);
4. marks the image ``reviewed`` in the store (``uploaded -> reviewed``).

The dataset is written before the store, so a crash in between is healed by the next run (the
dataset write is idempotent). ``add_auto_accepted`` follows the store's transitions into
``auto_accepted`` from a ``seq`` kept in the dataset. A call that changed the dataset records
its version, and so does the first call after a start (a version that an earlier, interrupted
run wrote but did not record).
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from service.keypoints import FLAG_VISIBILITY, VISIBILITY_FLAG
from service.outputs import iter_rows
from service.store import AUTO_ACCEPTED, REVIEWED, UPLOADED, ImageRow, Store

from .dataset import REVIEWED as HUMAN, Dataset, DatasetVersion, canonical_label
from .mistakenness import mistakenness

log = logging.getLogger(__name__)

MERGEABLE_STATES = (UPLOADED, REVIEWED)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or mapping key ``name`` of ``obj`` (review backends hand either)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _first(obj: Any, names: Sequence[str]) -> Any:
    for n in names:
        v = _get(obj, n)
        if v not in (None, ""):
            return v
    return None


def _box(b: Any) -> list[float]:
    box = _get(b, "box", b) if not isinstance(b, (list, tuple)) else b
    return [float(v) for v in box]


def _flag(kp: Any) -> tuple[float, float, int]:
    """(x, y, flag) of a key point given as an object, a dict or an (x, y, v) sequence;
    ``v`` is a visibility name or a COCO flag."""
    if isinstance(kp, (list, tuple)):
        x, y, v = kp[0], kp[1], kp[2]
    else:
        x, y, v = _get(kp, "x"), _get(kp, "y"), _first(kp, ("visibility", "flag", "v"))
    if isinstance(v, str):
        if v not in VISIBILITY_FLAG:
            raise ValueError(f"key point visibility: expected one of {sorted(VISIBILITY_FLAG)}, got {v!r}")
        f = VISIBILITY_FLAG[v]
    else:
        f = int(v)
        if f not in FLAG_VISIBILITY:
            raise ValueError(f"key point flag: expected 0, 1 or 2, got {v!r}")
    return float(x or 0.0), float(y or 0.0), f


def _remap(points: Sequence[tuple[float, float, int]], names: Sequence[str] | None,
           target: Sequence[str]) -> list[tuple[float, float, int]]:
    """Points in ``names`` order -> ``target`` order; target points the source lacks are outside."""
    if names is None:
        if len(points) != len(target):
            raise ValueError(f"{len(points)} key points without names; expected {len(target)} (the dataset's schema)")
        return list(points)
    if len(names) != len(points):
        raise ValueError(f"{len(points)} key points but {len(names)} key-point names")
    by_name = dict(zip(names, points))
    return [by_name.get(n, (0.0, 0.0, 0)) for n in target]


def auto_label(record: Mapping[str, Any], target: Sequence[str]) -> dict[str, Any]:
    """The canonical label of a stored annotation record (``service.daemon.record_for``)."""
    names = record.get("keypoint_names") or None
    persons = []
    for p in record.get("persons", []):
        pts = [_flag(k) for k in p.get("keypoints", [])]
        persons.append((_box(p["box"]), _remap(pts, names, target)))
    return canonical_label(record["width"], record["height"], [_box(h) for h in record.get("heads", [])], persons)


EDGE_TOLERANCE_PX = 1.0  # how far past the image's edge a reviewed box or point may lie (rounding)


def _check_geometry(heads: Sequence[Sequence[float]],
                    persons: Sequence[tuple[Sequence[float], Sequence[tuple[float, float, int]]]],
                    width: int, height: int, names: Sequence[str]) -> None:
    """ValueError unless every reviewed box and every placed (visible or occluded) point lies
    in the ``width`` x ``height`` image, and every head box has an area: a point off the image
    merged as visible, or a head box of no area, would be a wrong label in the training set.
    Outside points claim no location and are not checked."""
    tol = max(EDGE_TOLERANCE_PX, 0.001 * max(width, height))

    def inside(x: float, y: float) -> bool:
        return -tol <= x <= width + tol and -tol <= y <= height + tol

    for h in heads:
        if not (inside(h[0], h[1]) and inside(h[2], h[3])):
            raise ValueError(f"head box {[round(v, 2) for v in h]} lies outside the {width}x{height} image")
        if not (h[2] > h[0] and h[3] > h[1]):
            raise ValueError(f"head box {[round(v, 2) for v in h]} has no area (or its corners are swapped)")
    for n, (box, points) in enumerate(persons, start=1):
        if not (inside(box[0], box[1]) and inside(box[2], box[3])) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"person {n} box {[round(v, 2) for v in box]} lies outside the {width}x{height} image "
                             "(or its corners are swapped)")
        for name, (x, y, f) in zip(names, points):
            if f and not inside(x, y):
                raise ValueError(f"person {n} key point {name!r} at ({x:.1f}, {y:.1f}) is marked "
                                 f"{FLAG_VISIBILITY[f]} but lies outside the {width}x{height} image")


def reviewed_label(label: Any, target: Sequence[str], names: Sequence[str] | None,
                   auto: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical label of a reviewed label; its key points are in ``names`` order (the
    label's own ``keypoint_names`` when it has them). A label whose ``parts`` leave out
    ``heads`` or ``persons`` (e.g. a built-in bounding-box job) keeps that part of ``auto``
    (a canonical label: the auto label, or the image's earlier reviewed one); the image size
    is ``auto``'s.

    A label that gives its own size must give ``auto``'s (ValueError otherwise): coordinates
    in another frame (an EXIF-turned JPEG that the reviewer saw as stored, not upright) would
    be merged as if they were the image's, every box and point in the wrong place."""
    width, height = _get(label, "width"), _get(label, "height")
    if (width, height) != (None, None) and (int(width or 0), int(height or 0)) != (auto["width"], auto["height"]):
        raise ValueError(f"the review is of a {width}x{height} image, the image is {auto['width']}x{auto['height']} "
                         "(turned or scaled otherwise); its coordinates are not the image's")
    names = _get(label, "keypoint_names") or names
    parts = tuple(_get(label, "parts") or ("heads", "persons"))
    persons = []
    for p in _get(label, "persons") or ():
        pts = [_flag(k) for k in (_get(p, "keypoints") or ())]
        persons.append((_box(_get(p, "box")), _remap(pts, names, target)))
    heads = [_box(h) for h in (_get(label, "heads") or ())]
    _check_geometry(heads if "heads" in parts else [], persons if "persons" in parts else [],
                    auto["width"], auto["height"], target)
    if "heads" not in parts:
        heads = [list(h) for h in auto["heads"]]
    if "persons" not in parts:
        persons = [(p["box"], [tuple(k) for k in p["keypoints"]]) for p in auto["persons"]]
    return canonical_label(auto["width"], auto["height"], heads, persons)


def _iso(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(float(value), _dt.timezone.utc).isoformat()
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    return str(value)


def review_provenance(label: Any, row: ImageRow) -> dict[str, Any]:
    """Who reviewed what, where, when, and which bundle pre-labelled it."""
    adjusted = _get(label, "adjusted")
    return {"origin": "human", "backend": _get(label, "backend"),
            "job": _first(label, ("job_id", "job", "project_id", "project", "job_or_project")),
            "reviewer": _first(label, ("reviewer_id", "reviewer", "worker_id")),
            "reviewed_at": _iso(_get(label, "reviewed_at")),
            "adjusted": None if adjusted is None else bool(adjusted),
            "parts": list(_get(label, "parts") or ("heads", "persons")),
            "bundle_id": row.bundle_id, "score": row.score, "audit": row.audit}


def auto_provenance(row: ImageRow) -> dict[str, Any]:
    return {"origin": "auto", "bundle_id": row.bundle_id, "score": row.score,
            "reasons": list(row.reasons), "annotated_at": _iso((row.record or {}).get("annotated_at"))}


_NOT_IN_STORE = "not in the store (or never annotated)"


@dataclass
class MergeReport:
    """What one ``merge`` call did: merged image ids, skipped ones with the reason, the version."""

    merged: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    auto_added: int = 0
    auto_removed: int = 0  # auto labels of images whose bytes retention removed
    version: DatasetVersion | None = None

    @property
    def refused(self) -> dict[str, str]:
        """The skipped reviews that were refused for what they say (malformed, off the image,
        two that differ), not for where their image is (not in this store, not yet uploaded)."""
        return {i: why for i, why in self.skipped.items() if not why.startswith((_NOT_IN_STORE, "state is "))}


class Merger:
    """Brings reviewed and auto-accepted labels from the store into the dataset."""

    def __init__(self, store: Store, dataset: Dataset) -> None:
        self.store = store
        self.dataset = dataset
        # Whether the dataset may hold content with no version row: at a start (a run killed
        # between its writes and its record), and after each call that wrote.
        self._unrecorded = True
        self.auto_removed = 0  # auto labels taken out since the last merge report (retention)
        self._skipped_said: dict[str, str] = {}  # the last call's refusals (said once while they last)

    def merge(self, labels: Iterable[Any]) -> MergeReport:
        """Merge reviewed labels (see module doc); records the dataset version when it is new.

        Several labels of one image in one call (the image twice in an output manifest, in two
        jobs, in two tasks) merge once: the newest (``reviewed_at``). Newest ones of the same
        time that differ are refused together (``skipped``): taking either would be a guess, and
        taking each in turn changed the dataset on every pass."""
        report = MergeReport()
        target = self.dataset.schema.names
        labels, report.skipped = _one_per_image(labels)
        for label in labels:
            image_id = str(_get(label, "image_id"))
            row = self.store.get(image_id)
            if row is None or row.record is None:
                report.skipped[image_id] = _NOT_IN_STORE
                continue
            if row.state not in MERGEABLE_STATES:
                report.skipped[image_id] = f"state is {row.state}; only {'/'.join(MERGEABLE_STATES)} images merge"
                continue
            try:
                auto = auto_label(row.record, target)
                # A review of one part (a bounding-box job reviews heads) keeps the other part of
                # an earlier review, not the bundle's: a head-box adjustment chained on a
                # key-point job must not put the bundle's key points back.
                prev = self.dataset.get(image_id)
                base = prev.label if prev is not None and prev.origin == HUMAN else auto
                rev = reviewed_label(label, target, row.record.get("keypoint_names"), base)
                mist = mistakenness(auto, rev, self.dataset.schema.sigmas)
            except (ValueError, KeyError, TypeError) as exc:
                report.skipped[image_id] = f"malformed label: {exc}"
                log.warning("image %s: reviewed label refused: %s", image_id[:12], exc)
                continue
            prov = review_provenance(label, row)
            if prov["adjusted"] is None:
                prov["adjusted"] = mist.score > 0
            changed = self.dataset.put_reviewed(image_id, rev, prov, auto, mist.to_json(), row.decision, row.audit)
            self.store.set_state(image_id, (UPLOADED,), REVIEWED)
            (report.merged if changed else report.unchanged).append(image_id)
            # Said when it changed the dataset only: a backend yields every review it holds at
            # each collection, and every one ever merged was said again at every pass.
            if changed and prev is not None and prev.origin == HUMAN:  # a reviewer's correction
                log.info("image %s: corrected review merged: the review of %s (%s) replaces the one of %s (%s), "
                         "mistakenness %.3f", image_id[:12], prov["reviewed_at"], prov["reviewer"],
                         prev.provenance.get("reviewed_at"), prev.provenance.get("reviewer"), mist.score)
            elif changed:
                log.info("image %s: reviewed label merged (%s job %s, mistakenness %.3f)",
                         image_id[:12], prov["backend"], prov["job"], mist.score)
        report.auto_added = self.add_auto_accepted()
        report.auto_removed, self.auto_removed = self.auto_removed, 0
        # Also once after a start when nothing changed: a crash after the writes above and before
        # this left the dataset without a version row for its content, and after the restart the
        # same labels merge as "unchanged". (Not on every pass: the version hashes every label.)
        # record_version records nothing when the content is the last recorded version.
        note = f"merge: {len(report.merged)} reviewed, {report.auto_added} auto-accepted"
        if report.auto_removed:
            note += f", {report.auto_removed} auto-accepted removed (their bytes went by retention)"
        wrote = bool(report.merged or report.auto_added or report.auto_removed)
        self._unrecorded = self._unrecorded or wrote
        if self._unrecorded:
            report.version = self.dataset.record_version(note if wrote else note + " (earlier writes not recorded before)")
            self._unrecorded = False
        # Said once while it lasts: a backend yields the reviews it holds at every collection, so a
        # review that cannot merge (another appliance's image, one that failed meanwhile) was
        # warned about again at every pass, for as long as the review server kept it.
        # Reviews of images this store does not have are one line, not a warning each: appliances
        # sharing a review project (one Label Studio project, one Ground Truth output prefix) each
        # see all the others' reviews, and every start of an agent warned once per review there.
        foreign = sorted(i for i, why in report.skipped.items() if why == _NOT_IN_STORE
                         and self._skipped_said.get(i) != why)
        if foreign:
            log.info("%d reviews not merged: their images are not in this store or were never annotated (another "
                     "appliance's, on a review project appliances share; first %s)", len(foreign), foreign[0][:12])
        for image_id, why in report.skipped.items():
            log.log(logging.DEBUG if self._skipped_said.get(image_id) == why or why == _NOT_IN_STORE
                    else logging.WARNING, "image %s: not merged: %s", image_id[:12], why)
        self._skipped_said = dict(report.skipped)
        return report

    def add_auto_accepted(self, page: int = 500) -> int:
        """Add auto-accepted images that are not in the dataset yet; returns how many were added.

        It follows the store's transition log (``Store.entered``) from the ``seq`` kept in the
        dataset's meta ``auto_seq``. Paging by arrival, as this did before, lost for good an image
        that arrived early and was accepted late (a slow worker, an expired lease): the cursor had
        already passed it. A dataset without ``auto_seq`` (new, or written by that older code) is
        first swept whole: the store's newest ``seq`` is read before the sweep, so anything that
        enters during it is read again next time (``put_auto`` is idempotent)."""
        added = 0
        seq = self.dataset.meta("auto_seq")
        if seq is None:
            start = self.store.last_transition()
            added += self._put_auto(iter_rows(self.store, (AUTO_ACCEPTED,), page))
            self.dataset.meta("auto_seq", str(start))
            seq = str(start)
        after = int(seq)
        while True:
            rows, last = self.store.entered(AUTO_ACCEPTED, after=after, limit=page)
            added += self._put_auto(rows)
            if last == after:
                return added
            after = last
            self.dataset.meta("auto_seq", str(after))

    def _put_auto(self, rows: Iterable[ImageRow]) -> int:
        """Add these rows' auto labels; a row whose bytes retention removed (``pruned_at``: the
        store logs a transition for it, so this follows it too) is taken out instead: the
        dataset is what training can train on, and that needs the pixels."""
        target = self.dataset.schema.names
        added = 0
        for row in rows:
            if row.pruned_at is not None:
                self.auto_removed += self.dataset.remove_auto(row.image_id)
                continue
            if row.record is None:
                continue
            try:
                label = auto_label(row.record, target)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("image %s: auto label left out of the dataset: %s", row.image_id[:12], exc)
                continue
            added += self.dataset.put_auto(row.image_id, label, auto_provenance(row), row.decision)
        return added


def _one_per_image(labels: Iterable[Any]) -> tuple[list[Any], dict[str, str]]:
    """(labels with one per image id, in first-seen order; image id -> why refused) (see ``merge``)."""
    groups: dict[str, list[Any]] = {}
    for label in labels:
        groups.setdefault(str(_get(label, "image_id")), []).append(label)
    chosen, refused = [], {}
    for image_id, group in groups.items():
        if len(group) > 1:
            when = [str(_iso(_get(g, "reviewed_at")) or "") for g in group]
            group = [g for g, w in zip(group, when) if w == max(when)]
            contents = {repr([_get(g, k) for k in ("width", "height", "heads", "persons", "keypoint_names", "parts")])
                        for g in group}
            if len(contents) > 1:
                jobs = sorted({str(_first(g, ("job_id", "job", "project_id", "project"))) for g in group})
                refused[image_id] = (f"{len(group)} different reviews of the same time ({max(when)}; "
                                     f"{', '.join(jobs)}): not merged until one is newer")
                continue
        chosen.append(group[-1])
    return chosen, refused


class MergeTask:
    """A sync-agent task: ``run_once`` fetches reviewed labels and merges them.

    ``fetch`` returns the labels collected from the review backend since the last call (e.g.
    ``ReviewBackend.collect``); returns True when the dataset changed. ``on_merged(n)`` is
    told how many reviewed labels each call merged (e.g. a metrics counter), ``on_report`` each
    call's ``MergeReport`` (e.g. ``LabelStudioBackend.merged``).
    """

    name = "merge"

    def __init__(self, merger: Merger, fetch: Callable[[], Iterable[Any]],
                 on_merged: Callable[[int], None] | None = None,
                 on_report: Callable[[MergeReport], None] | None = None) -> None:
        self.merger = merger
        self.fetch = fetch
        self.on_merged = on_merged
        self.on_report = on_report

    def run_once(self) -> bool:
        report = self.merger.merge(list(self.fetch()))
        if self.on_merged is not None and report.merged:
            self.on_merged(len(report.merged))
        if self.on_report is not None:
            self.on_report(report)
        return bool(report.merged or report.auto_added or report.auto_removed)
