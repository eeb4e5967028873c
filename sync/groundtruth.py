"""SageMaker Ground Truth over S3 as a review backend.

Flow: ``submit`` writes a per-batch input manifest (one ``manifest_line`` per image, with the
pre-annotations and provenance) to ``<manifests>/<batch>.manifest`` in the object store and,
when a labeling-job spec and a SageMaker client are given, starts a custom labeling job
(``create_labeling_job``; otherwise the job is left to the cloud side). ``collect`` polls the
store for ``<output>/<job name>/manifests/output/output.manifest`` and parses each line, in
either the built-in bounding-box format or the custom key-point format written by the
consolidation Lambda (``sync.groundtruth_lambdas``), into ``ReviewedLabel`` objects.

Manifest keys: ``source-ref``, ``image-id``, ``edge-bundle``, ``edge-score``, ``edge-reasons``,
``edge-audit``, ``edge-appliance`` (when given), ``auto-head`` (+ ``auto-head-metadata``: the
built-in bounding-box label format, so a built-in adjustment job can start from it) and
``auto-kpts`` (the custom format of ``groundtruth_lambdas``, outside points at 0, 0).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from service.keypoints import CABIN19_NAMES, OUTSIDE

from .errors import ConflictError, ObjectNotFound, PermanentError, RetryableError
from .groundtruth_lambdas import consolidate, post_annotation_handler, pre_annotation_handler, task_input
from .objectstore import ObjectStore, check_key
from .review import HEADS, PERSONS, ReviewedKeypoint, ReviewedLabel, ReviewedPerson, ReviewItem, labels_differ

__all__ = ["GroundTruthBackend", "LabelingJobSpec", "ManifestError", "OUTPUT_MANIFEST", "consolidate",
           "create_labeling_job", "job_name_for", "label_category_config", "manifest_line",
           "parse_output_line", "post_annotation_handler", "pre_annotation_handler", "task_input"]

log = logging.getLogger(__name__)

BACKEND = "groundtruth"
OUTPUT_MANIFEST = "manifests/output/output.manifest"
MAX_LINE, MAX_ATTRIBUTE = 100_000, 20_000
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
JOB_NAME_MAX = 63
# The uploader names batches "<%Y%m%dT%H%M%SZ>-<seq:06d>": a prefix up to this long keeps job
# names "<prefix>-<batch id>" whole (sync.review_settings refuses longer ones).
BATCH_ID_LENGTH = 23
MAX_JOB_PREFIX = JOB_NAME_MAX - 1 - BATCH_ID_LENGTH


class ManifestError(PermanentError):
    """A manifest line breaks Ground Truth's limits or an output line cannot be read."""


def _round(v: float) -> float:
    return round(float(v), 1)


def _whole_pixels(box: Sequence[float]) -> dict[str, int]:
    """A head box as the built-in format's whole pixels: each edge rounded, so the right edge
    is ``round(x2)`` (rounding left and width apart put it 1 px off, and an unchanged review
    then came back moved)."""
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    return {"class_id": 0, "left": x1, "top": y1, "width": x2 - x1, "height": y2 - y1}


def manifest_line(source_ref: str, image_id: str, record: Mapping[str, Any], bundle_id: str,
                  score: float | None = None, reasons: Sequence[str] = (), audit: bool = False,
                  appliance_id: str | None = None) -> str:
    """One input-manifest line (compact JSON, no newline) for an image and its pre-annotation.

    ``record`` is the stored annotation record (``Prediction.to_json()`` plus optional
    ``keypoint_names`` and ``annotated_at``) in pixels of the uploaded image; a record rescaled
    for a downscaled upload (``sync.reencode``) carries ``original_size``, which goes into the
    line as ``edge-original-size`` so that reviewed labels come back in original pixels. Raises
    ``ManifestError`` when a limit (100,000 characters a line, 20,000 an attribute) is broken.
    """
    width, height = int(record["width"]), int(record["height"])
    names = list(record.get("keypoint_names") or CABIN19_NAMES)
    heads = record.get("heads", [])
    auto_head = {"image_size": [{"width": width, "height": height, "depth": 3}],
                 "annotations": [_whole_pixels(h["box"]) for h in heads]}
    meta: dict[str, Any] = {"objects": [{"confidence": round(float(h.get("conf", 0.0)), 3)} for h in heads],
                            "class-map": {"0": "head"}, "type": "groundtruth/object-detection",
                            "human-annotated": "no", "job-name": f"labeling-job/edge-{bundle_id}"}
    if record.get("annotated_at") is not None:
        meta["creation-date"] = _dt.datetime.fromtimestamp(float(record["annotated_at"]), _dt.timezone.utc
                                                           ).strftime("%Y-%m-%dT%H:%M:%S.%f")
    persons = []
    for p in record.get("persons", []):
        kps = []
        for name, k in zip(names, p["keypoints"]):
            outside = k["visibility"] == OUTSIDE
            kps.append({"label": name, "x": 0.0 if outside else _round(k["x"]), "y": 0.0 if outside else _round(k["y"]),
                        "visibility": k["visibility"]})
        persons.append({"box": [_round(v) for v in p["box"]], "keypoints": kps})
    auto_kpts = {"image_size": {"width": width, "height": height}, "keypoint_names": names, "persons": persons}
    line: dict[str, Any] = {"source-ref": source_ref, "image-id": image_id, "edge-bundle": bundle_id,
                            "edge-score": None if score is None else round(float(score), 4),
                            "edge-reasons": list(reasons), "edge-audit": bool(audit)}
    if appliance_id is not None:
        line["edge-appliance"] = appliance_id
    if record.get("original_size") and list(record["original_size"]) != [width, height]:
        line["edge-original-size"] = [int(v) for v in record["original_size"]]  # uploaded downscaled
    line.update({"auto-head": auto_head, "auto-head-metadata": meta, "auto-kpts": auto_kpts})
    for key, value in line.items():
        size = len(json.dumps(value, separators=(",", ":")))
        if size > MAX_ATTRIBUTE:
            raise ManifestError(f"manifest line for {image_id}: attribute {key!r} is {size} characters, "
                                f"Ground Truth allows {MAX_ATTRIBUTE} (too many persons?)")
    text = json.dumps(line, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_LINE:
        raise ManifestError(f"manifest line for {image_id} is {len(text)} characters, at most {MAX_LINE} allowed")
    return text


def label_category_config(names: Sequence[str] = CABIN19_NAMES) -> dict[str, Any]:
    """The label category config file (``LabelCategoryConfigS3Uri``): head, person, point names."""
    return {"document-version": "2018-11-28",
            "labels": [{"label": "head"}, {"label": "person"}] + [{"label": n} for n in names]}


def _name_part(text: str) -> str:
    """``text`` with every run of characters a job name cannot hold turned into one hyphen."""
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:size]


def job_name_for(prefix: str, batch_id: str) -> str:
    """A valid labeling-job name (letters, digits, hyphens, at most 63) for a batch:
    ``<prefix>-<batch id>``.

    Job names are unique per account and region, and a name in use makes CreateLabelingJob
    answer ResourceInUse, which ``create_labeling_job`` takes as "started already": two batches
    with one name would leave the second unlabelled. So a name that is too long loses the end
    of the prefix, never the batch id (which ends in the batch's sequence number), and the cut
    prefix ends in a digest of the whole prefix, so that long prefixes of different appliances
    stay apart. Only a batch id that alone leaves no room is cut, and then the name ends in a
    digest of prefix and batch id. Names that fit are unchanged.
    """
    part, batch = _name_part(prefix), _name_part(batch_id)
    name = f"{part}-{batch}" if part else batch
    room = JOB_NAME_MAX - 1 - len(batch)  # for the prefix
    if len(name) > JOB_NAME_MAX and room >= 8:
        name = f"{part[:room - 7].rstrip('-')}-{_digest(prefix, 6)}-{batch}"
    elif len(name) > JOB_NAME_MAX:
        whole = _digest(f"{prefix}\n{batch_id}", 12)
        name = f"{name[:JOB_NAME_MAX - 13].rstrip('-')}-{whole}"
    if not batch or not _JOB_NAME.match(name):
        raise ValueError(f"labeling job name: cannot make a valid name from {prefix!r} and {batch_id!r}")
    return name


@dataclass(frozen=True)
class LabelingJobSpec:
    """Everything CreateLabelingJob needs besides the job name and manifest (ARNs, S3 URIs)."""

    role_arn: str
    workteam_arn: str
    ui_template_s3_uri: str
    output_s3_path: str
    pre_lambda_arn: str | None = None
    consolidation_lambda_arn: str | None = None
    label_category_config_s3_uri: str | None = None
    label_attribute_name: str = "reviewed"
    task_title: str = "Check head boxes and body key points"
    task_description: str = "Correct head boxes, person boxes, key points and each point's visibility"
    workers_per_object: int = 1
    task_time_limit_s: int = 900
    job_prefix: str = "edge-review"
    kms_key_id: str | None = None


def create_labeling_job(sagemaker_client: Any, job_name: str, manifest_s3_uri: str, spec: LabelingJobSpec
                        ) -> str | None:
    """Start a custom labeling job; returns its ARN, or None when a job of that name exists.

    botocore errors are wrapped: throttling, HTTP 5xx/429 and connection trouble -> ``RetryableError``;
    a request the service model refuses, and any other service error -> ``PermanentError``.
    """
    from botocore.exceptions import ClientError

    human: dict[str, Any] = {
        "WorkteamArn": spec.workteam_arn, "UiConfig": {"UiTemplateS3Uri": spec.ui_template_s3_uri},
        "TaskTitle": spec.task_title, "TaskDescription": spec.task_description,
        "NumberOfHumanWorkersPerDataObject": spec.workers_per_object,
        "TaskTimeLimitInSeconds": spec.task_time_limit_s}
    if spec.pre_lambda_arn:
        human["PreHumanTaskLambdaArn"] = spec.pre_lambda_arn
    if spec.consolidation_lambda_arn:
        human["AnnotationConsolidationConfig"] = {"AnnotationConsolidationLambdaArn": spec.consolidation_lambda_arn}
    request: dict[str, Any] = {
        "LabelingJobName": job_name, "LabelAttributeName": spec.label_attribute_name,
        "InputConfig": {"DataSource": {"S3DataSource": {"ManifestS3Uri": manifest_s3_uri}}},
        "OutputConfig": {"S3OutputPath": spec.output_s3_path}, "RoleArn": spec.role_arn,
        "HumanTaskConfig": human}
    if spec.kms_key_id:
        request["OutputConfig"]["KmsKeyId"] = spec.kms_key_id
    if spec.label_category_config_s3_uri:
        request["LabelCategoryConfigS3Uri"] = spec.label_category_config_s3_uri
    try:
        arn = sagemaker_client.create_labeling_job(**request)["LabelingJobArn"]
    except Exception as exc:  # botocore errors, sorted as for S3 (5xx, 429, throttling: retryable)
        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code", "") == "ResourceInUse":
            log.info("labeling job %s exists already", job_name)
            return None
        from .s3store import wrap_boto_error

        raise wrap_boto_error(exc, "sagemaker", f"CreateLabelingJob {job_name}") from exc
    log.info("started labeling job %s", job_name)
    return str(arn)


def _epoch(text: str | None) -> float:
    """Seconds since the epoch of Ground Truth's ISO dates (no zone means UTC); 0 when missing."""
    if not text:
        return 0.0
    when = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def _label_attribute(line: Mapping[str, Any], kind: str | None = None) -> str | None:
    """The newest human-annotated label attribute of an output line (None when there is none);
    with ``kind``, the newest of that label type (e.g. "groundtruth/custom")."""
    found = []
    for key, meta in line.items():
        if key.endswith("-metadata") and isinstance(meta, Mapping) and key[:-9] in line:
            if kind is not None and str(meta.get("type", "")).lower() != kind:
                continue
            if str(meta.get("human-annotated", "yes")).lower() == "yes":
                found.append((str(meta.get("creation-date") or meta.get("creation_date") or ""), key[:-9]))
    return max(found)[1] if found else None


def _persons(persons: Sequence[Mapping[str, Any]], names: Sequence[str],
             known: Sequence[str] | None = None) -> tuple[ReviewedPerson, ...]:
    """Persons of the custom format (points by label) in ``names`` order; missing points outside.

    With ``known`` (the names this review may carry), a point of another label, or a label given
    twice in one person, is a ``ManifestError``: leaving it out turned a placed point into an
    ``outside`` one (a label renamed on the cloud side lost every point of that name)."""
    out = []
    for p in persons:
        given = {k["label"]: k for k in p.get("keypoints", [])}
        if known is not None:
            labels = [k["label"] for k in p.get("keypoints", [])]
            unknown = sorted({str(n) for n in labels} - set(known))
            if unknown:
                raise ManifestError(f"key point label {unknown[0]!r} is not one of the schema's names")
            if len(given) != len(labels):
                twice = next(n for n in labels if labels.count(n) > 1)
                raise ManifestError(f"key point {twice!r} given twice in one person")
        kps = tuple(ReviewedKeypoint(float(given[n]["x"]), float(given[n]["y"]), str(given[n]["visibility"]))
                    if n in given else ReviewedKeypoint(0.0, 0.0, OUTSIDE) for n in names)
        out.append(ReviewedPerson(tuple(p["box"]), kps))  # type: ignore[arg-type]
    return tuple(out)


def _auto_label(line: Mapping[str, Any], names: Sequence[str]) -> tuple[tuple[Any, ...], tuple[ReviewedPerson, ...]] | None:
    """The pre-annotation an output line carries (``auto-head``, ``auto-kpts``), as review types."""
    kpts, head = line.get("auto-kpts"), line.get("auto-head")
    if kpts is None or head is None:
        return None
    heads = tuple((a["left"], a["top"], a["left"] + a["width"], a["top"] + a["height"])
                  for a in head.get("annotations", []))
    return heads, _persons(kpts.get("persons", []), names)


def parse_output_line(line: Mapping[str, Any], names: Sequence[str] = CABIN19_NAMES,
                      attribute: str | None = None) -> ReviewedLabel | None:
    """A ``ReviewedLabel`` from one output-manifest line, or None when it holds no human label.

    Accepts the built-in bounding-box format (``groundtruth/object-detection``; heads only) and
    the custom format (``groundTruth/custom``), with ``job-name``/``creation-date`` or
    ``job_name``/``creation_date``; ``adjustment-status`` sets ``adjusted``. The newest label
    attribute is read (``attribute`` names another). A chained job's line carries the earlier
    jobs' attributes too: when the newest is a bounding-box review of the heads and the line
    also holds a key-point review, the label is both (the heads from the newer job), so the
    reviewed key points are not dropped for the bundle's own.
    """
    attribute = attribute or _label_attribute(line)
    if attribute is None:
        failed = [str(meta["failure-reason"]) for key, meta in line.items() if key.endswith("-metadata")
                  and isinstance(meta, Mapping) and meta.get("failure-reason") and key[:-9] not in line]
        if failed:  # a data object Ground Truth gave up on (a Lambda error, an expired task)
            raise ManifestError(f"output line for {_line_image_id(line)}: Ground Truth did not label it: {failed[0]}")
        return None
    value, meta = line[attribute], line[attribute + "-metadata"]
    job = str(meta.get("job-name") or meta.get("job_name") or "").removeprefix("labeling-job/")
    when = _epoch(meta.get("creation-date") or meta.get("creation_date"))
    status = meta.get("adjustment-status")
    adjusted = None if status is None else status == "adjusted"
    image_id = _line_image_id(line)
    kind = str(meta.get("type", "")).lower()
    if kind == "groundtruth/object-detection":
        size = value["image_size"][0]
        class_map = meta.get("class-map", {})
        heads = tuple((a["left"], a["top"], a["left"] + a["width"], a["top"] + a["height"])
                      for a in value.get("annotations", []) if class_map.get(str(a["class_id"]), "head") == "head")
        heads_label = _to_original(ReviewedLabel(image_id, int(size["width"]), int(size["height"]), heads, (),
                                                 BACKEND, job, when, None, adjusted, tuple(names), (HEADS,)), line)
        earlier = _label_attribute(line, kind="groundtruth/custom")
        full = parse_output_line(line, names, earlier) if earlier is not None else None
        if full is None or (heads_label.width, heads_label.height) != (full.width, full.height):
            # alone, a head box answer in another frame (the image seen turned) keeps its size,
            # and the merge refuses it instead of taking its boxes into the key-point answer
            return heads_label
        both = None if adjusted is None and full.adjusted is None else bool(adjusted or full.adjusted)
        return dataclasses.replace(full, heads=heads_label.heads, job=job, reviewed_at=max(when, full.reviewed_at),
                                   adjusted=both, parts=(HEADS, PERSONS))
    if kind != "groundtruth/custom":
        raise ManifestError(f"output line for {image_id}: unknown label type {meta.get('type')!r}")
    for problem in value.get("problems", []):
        log.warning("review of %s in %s: %s", image_id, job, problem)
    known = set(names) | {str(n) for n in (line.get("auto-kpts") or {}).get("keypoint_names") or ()}
    persons = _persons(value.get("persons", []), names, sorted(known))
    heads = tuple(tuple(h) for h in value.get("heads", []))
    size = value.get("image_size") or {}
    auto_size = (line.get("auto-kpts") or {}).get("image_size") or {}
    width, height = size.get("width") or auto_size.get("width"), size.get("height") or auto_size.get("height")
    if not width or not height:
        raise ManifestError(f"output line for {image_id}: no image size in the label or the pre-annotation")
    if adjusted is None:
        auto = _auto_label(line, names)
        # Head boxes travel as whole pixels in the manifest: allow the rounding.
        adjusted = None if auto is None else labels_differ(heads, persons, auto[0], auto[1], 1.0)  # type: ignore[arg-type]
    label = ReviewedLabel(image_id, int(width), int(height), heads, persons, BACKEND, job, when,  # type: ignore[arg-type]
                          value.get("workerId"), adjusted, tuple(names), (HEADS, PERSONS))
    return _to_original(label, line)


def _line_image_id(line: Mapping[str, Any]) -> str:
    """The image id of an output line: ``image-id``, else the name of ``source-ref``'s object."""
    return str(line.get("image-id") or str(line["source-ref"]).rsplit("/", 1)[-1].split(".", 1)[0])


def _uploaded_size(line: Mapping[str, Any]) -> tuple[int, int] | None:
    """The size of the uploaded image, as the line's pre-annotation gives it (None: neither
    ``auto-kpts`` nor ``auto-head`` says)."""
    head_sizes = (line.get("auto-head") or {}).get("image_size") or [None]
    size = (line.get("auto-kpts") or {}).get("image_size") or head_sizes[0]
    if not size or not size.get("width") or not size.get("height"):
        return None
    return int(size["width"]), int(size["height"])


def _to_original(label: ReviewedLabel, line: Mapping[str, Any]) -> ReviewedLabel:
    """``label`` rescaled per axis from the uploaded image's pixels to the original's
    (``edge-original-size``). Only a label of the uploaded size is rescaled: one of another size
    (the worker saw the image turned) keeps it, and the merge refuses it for not being the
    image's, where rescaling would have stretched it to fit."""
    original = line.get("edge-original-size")
    if not original or (int(original[0]), int(original[1])) == (label.width, label.height):
        return label
    uploaded = _uploaded_size(line)
    if uploaded is not None and uploaded != (label.width, label.height):
        log.warning("review of %s is of a %dx%d image, the upload was %dx%d; not rescaled", label.image_id,
                    label.width, label.height, *uploaded)
        return label
    sx, sy = int(original[0]) / label.width, int(original[1]) / label.height

    def box(b: Sequence[float]) -> tuple[float, float, float, float]:
        return (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)

    persons = tuple(ReviewedPerson(box(p.box), tuple(ReviewedKeypoint(k.x * sx, k.y * sy, k.visibility)
                                                     for k in p.keypoints)) for p in label.persons)
    return dataclasses.replace(label, width=int(original[0]), height=int(original[1]),
                               heads=tuple(box(h) for h in label.heads), persons=persons)


RETRY_SUFFIX = "-retry"  # the batch id of the images a batch's job ended without labelling
# Jobs started on the cloud side: a batch's images with no label this long after the batch
# (the longest a private workforce's task stays available, TaskAvailabilityLifetimeInSeconds)
# are said: the job ended without them, or none was started.
UNLABELLED_AFTER_S = 30 * 86400.0


@dataclass(frozen=True)
class _JobOutcome:
    status: str  # Completed, Failed, Stopped, NotFound
    labeled: set[str]
    reasons: dict[str, str]  # image id -> failure-reason of its output line
    failure: str | None  # DescribeLabelingJob's FailureReason
    output: bool  # whether the output manifest exists


class GroundTruthBackend:
    """``ReviewBackend`` over an object store laid out like the S3 bucket (see the module docstring)."""

    name = BACKEND

    def __init__(self, store: ObjectStore, manifests_prefix: str | None = None,
                 output_prefix: str = "groundtruth/output", job: LabelingJobSpec | None = None,
                 sagemaker_client: Any = None, names: Sequence[str] = CABIN19_NAMES,
                 appliance_id: str | None = None, resubmit_stopped: bool = False,
                 clock: Any = time.time) -> None:
        self.store, self.job, self.client = store, job, sagemaker_client
        # a job a user stopped (StopLabelingJob) was meant to end: its unlabelled images are
        # said, and sent again (``<batch>-retry``) only with this ([sync.review.groundtruth])
        self.resubmit_stopped = resubmit_stopped
        self.clock = clock
        # The uploader (sync.uploader) writes manifests/<appliance>/<batch>.manifest: same place.
        default = f"manifests/{appliance_id}" if appliance_id else "manifests"
        self.manifests_prefix = (manifests_prefix or default).strip("/")
        self.output_prefix = output_prefix.strip("/")
        self.names, self.appliance_id = tuple(names), appliance_id
        self.rejected: dict[str, str] = {}
        self._pending: dict[str, set[str]] = {}  # output manifest -> image ids given but not settled yet
        self._done: set[str] = set()  # output manifests with nothing left to merge (``collect``)
        self.stuck: dict[str, str] = {}  # image id -> why no job will review it (``missing_items``)
        self._outcomes: dict[str, _JobOutcome] = {}  # ended labeling jobs (``_job_outcome``)
        self._made: dict[str, float] = {}  # batch id -> when its manifest was written, by this box's clock
        self._describe_said: str | None = None

    def manifest_key(self, batch_id: str) -> str:
        return f"{self.manifests_prefix}/{batch_id}.manifest"

    def submit(self, batch_id: str, items: Sequence[ReviewItem]) -> None:
        """Write the batch's manifest unless it exists (the uploader may have written it) and
        holds every item (else ``ConflictError``: a batch id must not be reused); then start
        the labeling job when configured (a job that exists already is left alone)."""
        if not items:
            return
        key = self.manifest_key(batch_id)
        if self.store.head(key) is None:
            lines = []
            for item in items:
                if not item.image_uri:
                    raise ValueError(f"Ground Truth needs an image URI for {item.image_id}; got only {item.local_path}")
                lines.append(manifest_line(item.image_uri, item.image_id, item.record, item.bundle_id, item.score,
                                           item.reasons, item.audit, self.appliance_id))
            self.store.put(key, ("\n".join(lines) + "\n").encode(), content_type="application/jsonlines")
            log.info("wrote manifest %s (%d images)", key, len(lines))
        else:
            present = {json.loads(t)["image-id"] for t in self.store.get(key).decode().splitlines() if t.strip()}
            missing = [i.image_id for i in items if i.image_id not in present]
            if missing:
                raise ConflictError(f"manifest {key} exists without {len(missing)} of these images "
                                    f"(first {missing[0][:12]}); a batch id must not be reused")
        if self.job is not None and self.client is not None:
            create_labeling_job(self.client, job_name_for(self.job.job_prefix, batch_id), self.store.uri(key), self.job)

    # -- images a labeling job ended without labelling -------------------------------------
    def resubmit(self, batch_id: str, items: Sequence[ReviewItem]) -> None:
        """Submit again, in a job of their own (``<batch>-retry``), images that the batch's job
        ended without labelling (``missing_items``). The same name at each try: a killed try is
        finished (manifest there, CreateLabelingJob answers ResourceInUse), never repeated."""
        self.submit(batch_id + RETRY_SUFFIX, items)

    def missing_items(self, items: Sequence[Any]) -> set[str]:
        """The image ids among ``items`` (journal items: ``image_id``, ``batch_id``) that the
        batch's labeling job ended (Completed, Failed, Stopped) without labelling (absent from
        its output manifest, or there with a ``failure-reason``: an expired task, a Lambda
        error) and that were not submitted again yet: ``sync.submit`` hands them to
        ``resubmit``. An image that its retry job did not label either is not sent a third
        time: it stays ``uploaded`` and is said (``stuck``, a warning naming the reason).
        A job that ended Stopped was stopped by someone (StopLabelingJob, the console), who
        meant its review to end: its images are said with the setting that sends them again
        (``resubmit_stopped``), not sent again (a paid job) on their own.
        Only for jobs this backend starts (a spec and a SageMaker client); a job still running,
        or one DescribeLabelingJob cannot tell about, leaves its images waiting, said.

        Without a SageMaker client (jobs started on the cloud side) nothing is sent again (the
        agent cannot tell a job's end, and what a cloud side does with a new manifest is its
        own): images still without a label ``UNLABELLED_AFTER_S`` after their batch was made
        are said, once a batch, naming its manifest (``stuck``)."""
        waiting = {str(item.image_id) for item in items}
        self.stuck = {k: v for k, v in self.stuck.items() if k in waiting}  # labelled since: no longer
        if self.job is None or self.client is None:
            self._say_unlabelled(items)
            return set()
        by_batch: dict[str, set[str]] = {}
        for item in items:
            by_batch.setdefault(str(item.batch_id), set()).add(str(item.image_id))
        lost: set[str] = set()
        asked = {job_name_for(self.job.job_prefix, b + s) for b in by_batch for s in ("", RETRY_SUFFIX)}
        self._outcomes = {k: v for k, v in self._outcomes.items() if k in asked}  # only jobs with images waiting
        for batch_id, ids in sorted(by_batch.items()):
            job = job_name_for(self.job.job_prefix, batch_id)
            first = self._job_outcome(job)
            if first is None:
                continue
            left = ids - first.labeled
            if not left:
                continue
            retry_job = job_name_for(self.job.job_prefix, batch_id + RETRY_SUFFIX)
            if first.status == "NotFound" or (first.status == "Completed" and not first.output):
                why = ("DescribeLabelingJob does not know it (another account or region? deleted?)"
                       if first.status == "NotFound" else
                       f"it is Completed but its output manifest {self._output_key(job)} is gone (deleted?)")
                self._say_stuck(left, f"labeling job {job}: {why}; not sent for review again")
                continue
            retry = self._job_outcome(retry_job)
            if retry is None:
                continue  # the retry job runs
            if retry.status == "NotFound" and first.status == "Stopped" and not self.resubmit_stopped:
                self._say_stuck(left, f"labeling job {job} was Stopped (StopLabelingJob, the console) before "
                                      "labelling them; not sent for review again on their own: set "
                                      "[sync.review.groundtruth] resubmit_stopped = true and restart the agent to "
                                      f"send them once, in job {retry_job}")
                continue
            if retry.status == "NotFound":
                lost |= left
                reasons = sorted({first.reasons.get(i, "never labelled") for i in left})
                log.warning("labeling job %s ended %s%s without labelling %d of its images (%s); they go to "
                            "review again in job %s", job, first.status,
                            f" ({first.failure})" if first.failure else "", len(left), "; ".join(reasons)[:300],
                            retry_job)
                continue
            still = left - retry.labeled
            for image_id in still:
                why = retry.reasons.get(image_id) or first.reasons.get(image_id) or "never labelled"
                self._say_stuck({image_id}, f"not labelled by labeling job {job} ({first.status}) nor by its "
                                            f"retry {retry_job} ({retry.status}): {why}; left uploaded, not sent "
                                            "a third time")
        return lost

    def _say_unlabelled(self, items: Sequence[Any]) -> None:
        """Say the images of batches older than ``UNLABELLED_AFTER_S`` (the batch id starts with
        its UTC time, ``%Y%m%dT%H%M%SZ``) that no output manifest labelled (jobs started on the
        cloud side; see ``missing_items``)."""
        by_batch: dict[str, set[str]] = {}
        for item in items:
            by_batch.setdefault(str(item.batch_id), set()).add(str(item.image_id))
        now = self.clock()
        self._made = {b: t for b, t in self._made.items() if b in by_batch}  # batches with images waiting
        for batch_id, ids in sorted(by_batch.items()):
            try:
                made = _dt.datetime.strptime(batch_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=_dt.timezone.utc)
            except ValueError:
                continue  # not the uploader's name: its age is unknown
            if now - made.timestamp() >= UNLABELLED_AFTER_S and now - self._written(batch_id) >= UNLABELLED_AFTER_S:
                self._say_stuck(ids, f"handed to Ground Truth in manifest {self.manifest_key(batch_id)} over "
                                     f"{UNLABELLED_AFTER_S / 86400:.0f} days ago and labelled in no output "
                                     f"manifest under {self.output_prefix}/ (its labeling job ended without them, "
                                     "or none was started); they wait uploaded: start a labeling job on them on "
                                     "the cloud side")

    def _written(self, batch_id: str) -> float:
        """When the batch's manifest was written, by this box's clock now: the bucket's
        LastModified moved by the bucket's clock's offset from this one (read once a batch). The
        batch id's time is this box's clock when the batch was made: a box whose clock was 40
        days behind at boot (no battery clock, before NTP) named a batch made now 40 days old,
        and its images were said to wait for good at once. Minus infinity (the id decides) for
        a store without times or a manifest not found."""
        if batch_id not in self._made:
            listing = getattr(self.store, "list_with_times", None)
            key = self.manifest_key(batch_id)
            made = -math.inf
            if listing is not None:
                try:
                    found = listing(key)
                except RetryableError:
                    return -math.inf  # asked again at the next pass
                if key in found.objects:
                    made = found.objects[key][0] + (time.time() - found.now)
            self._made[batch_id] = made
        return self._made[batch_id]

    def _say_stuck(self, image_ids: set[str], why: str) -> None:
        new = sorted(i for i in image_ids if self.stuck.get(i) != why)
        for image_id in image_ids:
            self.stuck[image_id] = why
        if new:
            log.warning("%d images wait for review for good (first %s): %s", len(new), new[0][:12], why)

    def _output_key(self, job: str) -> str:
        return f"{self.output_prefix}/{job}/{OUTPUT_MANIFEST}"

    def _job_outcome(self, job: str) -> "_JobOutcome | None":
        """How ``job`` ended: its status and the images its output manifest labelled or gave up
        on; status ``NotFound`` when DescribeLabelingJob does not know it; None while it runs or
        when DescribeLabelingJob fails (throttled, refused: said, and asked again later)."""
        if job in self._outcomes:
            return self._outcomes[job]
        from botocore.exceptions import ClientError

        failure = None
        try:
            answer = self.client.describe_labeling_job(LabelingJobName=job)
            status = str(answer.get("LabelingJobStatus", ""))
            failure = answer.get("FailureReason")
        except Exception as exc:
            code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
            if code in ("ResourceNotFound", "ResourceNotFoundException"):
                status = "NotFound"
            else:
                from .s3store import wrap_boto_error

                err = wrap_boto_error(exc, "sagemaker", f"DescribeLabelingJob {job}")
                hint = "" if isinstance(err, RetryableError) else (
                    "; the agent's identity needs sagemaker:DescribeLabelingJob to send again the images a "
                    "failed, stopped or expired job did not label")
                if self._describe_said != str(err):
                    log.warning("%s%s; its images wait (asked again at the next check)", err, hint)
                    self._describe_said = str(err)
                return None
        if status not in ("Completed", "Failed", "Stopped", "NotFound"):
            return None  # Initializing, InProgress, Stopping
        labeled: set[str] = set()
        reasons: dict[str, str] = {}
        output = True
        try:
            data = self.store.get(self._output_key(job))
        except ObjectNotFound:
            data, output = b"", False
        for raw in data.split(b"\n"):
            try:
                line = json.loads(raw.decode("utf-8"))
                image_id = _line_image_id(line)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                continue
            if _label_attribute(line) is not None:
                labeled.add(image_id)
                continue
            for key, meta in line.items():
                if key.endswith("-metadata") and isinstance(meta, Mapping) and meta.get("failure-reason"):
                    reasons[image_id] = str(meta["failure-reason"])
        if status == "NotFound" and output:
            status = "Completed"  # its output tells how it ended
        outcome = _JobOutcome(status, labeled, reasons, failure, output)
        if status != "NotFound":
            self._outcomes[job] = outcome  # an ended job and its output manifest do not change
        return outcome

    def collect(self) -> Iterator[ReviewedLabel]:
        """Parse every output manifest under the output prefix; bad lines go to ``rejected``
        (logged when first refused, or refused for another reason).

        Each line stands alone: one that is not UTF-8, not JSON, not an object or not a label
        of ours (a truncated write, a hand-edited file, another tool's job in the prefix) is
        refused and the other lines of that manifest, and the other manifests, still come
        back. A manifest deleted between the listing and the read is left for the next pass.

        A job's output manifest is written once, when the job ends (job names are never
        reused): once every label it gave was merged, refused for what it says or found not to
        be this store's (``merged``, told by the merge task), it is not read again by this
        process. The jobs are found by a delimiter listing (one entry per job), not by listing
        every worker response under them: after a year of jobs each pass read hundreds of
        thousands of keys and every manifest ever written.

        What is kept of a manifest (done, pending, refused lines) goes with it when it leaves the
        listing (a lifecycle rule, a clean-up): this process's memory follows the bucket, not
        every job it ever read."""
        keys = self._output_manifests()
        listed = set(keys)
        self._done &= listed
        for gone in [k for k in self._pending if k not in listed]:
            del self._pending[gone]
        if self.rejected:
            self.rejected = {w: why for w, why in self.rejected.items() if w.rsplit(":", 1)[0] in listed}
        for key in keys:
            if key in self._done:
                continue
            try:
                check_key(key)
            except ValueError as exc:  # a folder named ".." in the bucket: every read of it raised, each pass
                self._refuse(f"{key}:0", f"not read: {exc}")
                continue
            try:
                data = self.store.get(key)
            except ObjectNotFound:  # a job still running; or deleted since the listing
                log.debug("output manifest %s not there (yet); skipped", key)
                continue
            pending: set[str] = set()
            self._pending[key] = pending
            # JSON Lines: split on "\n" only (str.splitlines also cut at U+2028 inside a string)
            for number, raw in enumerate(data.split(b"\n"), start=1):
                if not raw.strip():
                    continue
                line: Any = None
                try:
                    line = json.loads(raw.decode("utf-8"))
                    if not isinstance(line, Mapping):
                        raise ManifestError(f"expected a JSON object, got {type(line).__name__}")
                    label = parse_output_line(line, self.names)
                except (ManifestError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                        ArithmeticError, RecursionError) as exc:
                    # ArithmeticError: float() of a huge integer; RecursionError: arrays nested
                    # thousands deep (it stopped every collect); the others: a value of another shape
                    why = str(exc) if isinstance(exc, (ManifestError, ValueError)) else f"{type(exc).__name__}: {exc}"
                    if isinstance(line, Mapping) and line.get("image-id") and str(line["image-id"]) not in why:
                        why = f"image {line['image-id']}: {why}"
                    self._refuse(f"{key}:{number}", why)
                    continue
                if label is not None:
                    pending.add(label.image_id)
                    yield label
            if not pending:
                self._finish(key)

    def _output_manifests(self) -> list[str]:
        """The output manifests' keys: ``<output prefix>/<job>/manifests/output/output.manifest``
        of each job folder when the store lists folders, else every key that ends so."""
        folders = getattr(self.store, "folders", None)
        if folders is None:
            return [k for k in self.store.list(self.output_prefix + "/") if k.endswith("/" + OUTPUT_MANIFEST)]
        return [f"{self.output_prefix}/{job}/{OUTPUT_MANIFEST}" for job in folders(self.output_prefix + "/")]

    def merged(self, report: Any) -> None:
        """The merge task's report of the labels ``collect`` gave (``sync.merge.MergeReport``):
        a manifest whose every label was merged (or unchanged), refused for what it says, or
        not this store's is done (not read again); one whose image was not ready (``state is
        ...``) is read again next pass."""
        settled = set(report.merged) | set(report.unchanged) | {
            i for i, why in report.skipped.items() if not why.startswith("state is ")}
        for key, pending in list(self._pending.items()):
            pending -= settled
            if not pending:
                self._finish(key)

    def _finish(self, key: str) -> None:
        self._pending.pop(key, None)
        self._done.add(key)

    def _refuse(self, where: str, why: str) -> None:
        if self.rejected.get(where) != why:
            log.warning("output line %s refused: %s", where, why)
        self.rejected[where] = why
