"""Settings of the review backend: the ``[sync.review]`` tables, and opening the backend.

::

    [sync.review]
    kind = "groundtruth"             # "groundtruth", "labelstudio" or "none" (default: no review)
    collect_interval = 60.0          # seconds between collections of finished reviews

    [sync.review.groundtruth]        # reads and writes the [sync.target] store (an S3 bucket)
    output_prefix = "groundtruth/output/<appliance_id>"   # where jobs write their output
    region = "eu-central-1"          # SageMaker's region (default: [sync.target] region)
    resubmit_stopped = false         # true: images a Stopped job did not label go to <job>-retry

    [sync.review.groundtruth.job]    # optional: start one labeling job per batch
    role_arn = "arn:aws:iam::123456789012:role/GroundTruth"
    workteam_arn = "arn:aws:sagemaker:eu-central-1:123456789012:workteam/private-crowd/cabin"
    ui_template_s3_uri = "s3://edge-review/templates/keypoints.liquid.html"
    # output_s3_path, pre_lambda_arn, consolidation_lambda_arn, label_category_config_s3_uri,
    # label_attribute_name, task_title, task_description, workers_per_object,
    # task_time_limit_s, job_prefix (at most 39 characters), kms_key_id: see
    # sync.groundtruth.LabelingJobSpec

    [sync.review.labelstudio]
    url = "http://127.0.0.1:8080"
    token = "..."                    # prefer ANNOTATOR_LABEL_STUDIO_TOKEN (wins over the file)
    project_title = "edge review <appliance_id>"
    document_root = "/var/lib/annotator/store"   # the server's LOCAL_FILES_DOCUMENT_ROOT
    timeout = 30.0

Validation happens in ``review_settings_from`` before anything is opened; errors name the key
and where its value came from (the file, or ``ANNOTATOR_LABEL_STUDIO_TOKEN`` for the token).
The Label Studio token is kept out of ``repr`` and never logged.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .config import SyncConfig, at
from .config import checked_table as _checked
from .errors import SyncConfigError
from .groundtruth import BATCH_ID_LENGTH, MAX_JOB_PREFIX, LabelingJobSpec, _name_part
from .objectstore import join_prefix

if TYPE_CHECKING:
    from service.store import Store

    from .objectstore import ObjectStore
    from .review import ReviewBackend

log = logging.getLogger(__name__)

TOKEN_ENV = "ANNOTATOR_LABEL_STUDIO_TOKEN"
KINDS = ("groundtruth", "labelstudio", "none")
_REVIEW_KEYS = {"kind": str, "collect_interval": (int, float), "groundtruth": dict, "labelstudio": dict}
_GT_KEYS = {"output_prefix": str, "region": str, "job": dict, "resubmit_stopped": bool}
_LS_KEYS = {"url": str, "token": str, "project_title": str, "document_root": str, "timeout": (int, float)}
_JOB_INTS = ("workers_per_object", "task_time_limit_s")
_JOB_TYPES = {f.name: int if f.name in _JOB_INTS else str for f in dataclasses.fields(LabelingJobSpec)}
_JOB_REQUIRED = ("role_arn", "workteam_arn", "ui_template_s3_uri")
_JOB_S3_URIS = ("ui_template_s3_uri", "label_category_config_s3_uri", "output_s3_path")
_JOB_ARNS = ("role_arn", "workteam_arn", "pre_lambda_arn", "consolidation_lambda_arn")


@dataclass(frozen=True)
class GroundTruthSettings:
    output_prefix: str
    region: str | None = None
    job: Mapping[str, Any] | None = None  # LabelingJobSpec fields; output_s3_path filled in at open
    resubmit_stopped: bool = False  # see GroundTruthBackend.missing_items


@dataclass(frozen=True)
class LabelStudioSettings:
    url: str
    token: str = field(repr=False)
    project_title: str
    document_root: Path
    timeout: float = 30.0


@dataclass(frozen=True)
class ReviewSettings:
    kind: str = "none"
    collect_interval: float = 60.0
    groundtruth: GroundTruthSettings | None = None
    labelstudio: LabelStudioSettings | None = None


def review_settings_from(cfg: SyncConfig, env: Mapping[str, str]) -> ReviewSettings:
    """Validate ``[sync.review]`` of ``cfg``; the Label Studio token comes from ``env`` first.
    Each error ends with where the value came from (``cfg.source``, or the token's variable)."""
    w = at(cfg.source)
    table = _checked(cfg.tables.get("review", {}), _REVIEW_KEYS, "sync.review", cfg.source)
    kind = table.get("kind", "none")
    if kind not in KINDS:
        raise SyncConfigError(f"sync.review.kind: expected one of {', '.join(KINDS)}, got {kind!r}{w}")
    interval = float(table.get("collect_interval", 60.0))
    if interval < 0:
        raise SyncConfigError(f"sync.review.collect_interval: expected >= 0, got {interval}{w}")
    # Both backends' tables are checked for unknown keys and types, whichever is chosen.
    gt_table = _checked(table.get("groundtruth", {}), _GT_KEYS, "sync.review.groundtruth", cfg.source)
    resubmit_stopped = bool(gt_table.pop("resubmit_stopped", False))
    job = _checked(gt_table["job"], _JOB_TYPES, "sync.review.groundtruth.job", cfg.source) if "job" in gt_table else None
    ls_table = _checked(table.get("labelstudio", {}), _LS_KEYS, "sync.review.labelstudio", cfg.source)
    gt = ls = None
    if kind == "groundtruth":
        if job is not None:
            missing = [k for k in _JOB_REQUIRED if not job.get(k)]
            if missing:
                raise SyncConfigError(f"sync.review.groundtruth.job.{missing[0]}: required to start labeling jobs "
                                      f"(or leave out [sync.review.groundtruth.job] and start jobs on the cloud side){w}")
            if cfg.target.kind != "s3":
                raise SyncConfigError(f"sync.review.groundtruth.job: labeling jobs read S3; needs [sync.target] kind = 's3'{w}")
            # Checked here, not by CreateLabelingJob: a typo there ("s3:/edge/...") stopped the
            # agent at the first batch's job, an upload pass after its start.
            for key in _JOB_S3_URIS:
                if job.get(key) and not (job[key].startswith("s3://") and job[key][5:].partition("/")[0]):
                    raise SyncConfigError(f"sync.review.groundtruth.job.{key}: expected s3://bucket/key, "
                                          f"got {job[key]!r}{w}")
            for key in _JOB_ARNS:
                if job.get(key) and not job[key].startswith("arn:"):
                    raise SyncConfigError(f"sync.review.groundtruth.job.{key}: expected an ARN (arn:aws:...), "
                                          f"got {job[key]!r}{w}")
            for key, low in (("workers_per_object", 1), ("task_time_limit_s", 30)):
                if key in job and job[key] < low:
                    raise SyncConfigError(f"sync.review.groundtruth.job.{key}: expected >= {low}, got {job[key]}{w}")
            prefix = job.get("job_prefix")
            if prefix is not None and not 0 < len(_name_part(prefix)) <= MAX_JOB_PREFIX:
                # A longer prefix would be cut (sync.groundtruth.job_name_for) and the jobs no
                # longer be found in the console by it.
                raise SyncConfigError(
                    f"sync.review.groundtruth.job.job_prefix: expected 1 to {MAX_JOB_PREFIX} letters, digits or "
                    f"hyphens (a labeling-job name is <job_prefix>-<batch id>, at most 63 characters, and a batch "
                    f"id takes {BATCH_ID_LENGTH}), got {prefix!r}{w}")
        output = gt_table.get("output_prefix", f"groundtruth/output/{cfg.appliance_id}").strip("/")
        if not output:
            raise SyncConfigError(f"sync.review.groundtruth.output_prefix: expected a key prefix, got ''{w}")
        given = (job or {}).get("output_s3_path")
        collected = f"s3://{cfg.target.bucket}/{join_prefix(cfg.target.prefix, output)}"
        if given and given.rstrip("/") != collected:
            # The agent finds finished jobs by listing output_prefix in the target bucket: jobs
            # writing anywhere else would never be collected, silently.
            raise SyncConfigError(f"sync.review.groundtruth.job.output_s3_path: {given!r} is not where the agent "
                                  f"collects the jobs' output ({collected}, the target bucket and "
                                  f"[sync.review.groundtruth] output_prefix); leave it out or set it to that{w}")
        gt = GroundTruthSettings(output, gt_table.get("region") or cfg.target.region, job, resubmit_stopped)
    elif kind == "labelstudio":
        t = ls_table
        if not t.get("url", "").startswith(("http://", "https://")):
            raise SyncConfigError(f"sync.review.labelstudio.url: expected http(s)://host:port, got {t.get('url')!r}{w}")
        token = env.get(TOKEN_ENV) or t.get("token") or ""
        if not token:
            raise SyncConfigError(f"sync.review.labelstudio.token: required (set {TOKEN_ENV} in the environment, "
                                  f"or token in [sync.review.labelstudio] of the file){w}")
        if len(token) < 6:  # what Label Studio's tokens never are: a placeholder or a cut paste
            came = f"from {TOKEN_ENV}" if env.get(TOKEN_ENV) else cfg.source or "from the file"
            raise SyncConfigError(f"sync.review.labelstudio.token: too short ({len(token)} characters, {came}); paste "
                                  "the whole token of Label Studio's Account & Settings page")
        timeout = float(t.get("timeout", 30.0))
        if not timeout > 0:  # 0: every request failed "Operation now in progress"; < 0: a ValueError, each pass
            raise SyncConfigError(f"sync.review.labelstudio.timeout: expected a number of seconds > 0, got {timeout}{w}")
        root = (cfg.base / t["document_root"]).resolve() if "document_root" in t else cfg.store_root.resolve()
        if not cfg.store_root.resolve().is_relative_to(root):
            held = f" ({cfg.store_root_source})" if cfg.store_root_source else ""
            raise SyncConfigError(f"sync.review.labelstudio.document_root: the store {cfg.store_root}{held} must lie "
                                  f"under it (Label Studio serves the images from there), got {root}{w}")
        ls = LabelStudioSettings(t["url"], token, t.get("project_title", f"edge review {cfg.appliance_id}"), root,
                                 timeout)
    return ReviewSettings(kind, interval, gt, ls)


def open_review_backend(settings: ReviewSettings, target: ObjectStore, cfg: SyncConfig,
                        store: Store | None = None) -> ReviewBackend | None:
    """The configured backend (None for ``kind = "none"``); boto3 only for a labeling-job spec.
    ``store``: the appliance's, which tells a Label Studio project's copies of its own images from
    those of other appliances on the same project (``LabelStudioBackend.holds``)."""
    if settings.groundtruth is not None:
        from .groundtruth import GroundTruthBackend

        gt, spec, client = settings.groundtruth, None, None
        if gt.job is not None:
            import boto3

            values = dict(gt.job)
            values.setdefault("output_s3_path", target.uri(gt.output_prefix))
            values.setdefault("job_prefix", f"er-{cfg.appliance_id[:30]}")
            spec = LabelingJobSpec(**values)
            client = boto3.session.Session().client("sagemaker", region_name=gt.region)
        log.info("review backend: Ground Truth, output %s, %s", gt.output_prefix,
                 "starting labeling jobs" if spec else "jobs started on the cloud side")
        return GroundTruthBackend(target, output_prefix=gt.output_prefix, job=spec, sagemaker_client=client,
                                  appliance_id=cfg.appliance_id, resubmit_stopped=gt.resubmit_stopped)
    if settings.labelstudio is not None:
        from .labelstudio import LabelStudioBackend
        from .labelstudio_client import LabelStudioClient

        ls = settings.labelstudio
        log.info("review backend: Label Studio at %s, project %r", ls.url, ls.project_title)
        holds = None if store is None else (lambda start: bool(store.find(start, 1)))
        return LabelStudioBackend(LabelStudioClient(ls.url, ls.token, ls.timeout), ls.project_title, ls.document_root,
                                  holds=holds)
    return None
