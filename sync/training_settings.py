"""Settings of the cloud training job: the ``[sync.training]`` table (``sync.training_job``).

Validated before anything is opened; errors name the key and the file (``SyncConfigError``). Every
hyperparameter is passed to SageMaker as a string (the training-job API's rule); the entry
point (``exporter.sagemaker_entry``) parses them back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import at, checked_table, endpoint_problem
from .errors import SyncConfigError

_KEYS: dict[str, Any] = {
    "role_arn": str, "image_uri": str, "instance_type": str, "input_s3": str, "output_s3": str,
    "min_new_reviewed": int, "poll_interval": (int, float), "max_runtime_s": int, "volume_gb": int,
    "region": str, "endpoint_url": str, "job_prefix": str, "sign_key": str, "hyperparameters": dict,
    "propagate": int,
}


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); ``ValueError`` for anything else."""
    if not uri.startswith("s3://") or not uri[5:].partition("/")[0]:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


@dataclass(frozen=True)
class TrainingSettings:
    """One SageMaker training setup (see ``sync.training_job`` for the meaning of each key)."""

    role_arn: str
    image_uri: str
    input_s3: str
    output_s3: str
    appliance_id: str = "appliance"
    instance_type: str = "ml.g4dn.xlarge"
    min_new_reviewed: int = 200
    poll_interval: float = 300.0
    max_runtime_s: int = 86400
    volume_gb: int = 30
    region: str | None = None
    endpoint_url: str | None = None
    job_prefix: str = "annotator"
    sign_key: Path | None = None
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    propagate: int | None = None  # dHash bits of ``sync.propagate`` in the job's export; None: off


def training_settings_from(table: Mapping[str, Any], appliance_id: str, base: Path,
                           source: str = "") -> TrainingSettings:
    """Build ``TrainingSettings`` from ``[sync.training]``; relative ``sign_key`` from ``base``;
    ``source`` (``SyncConfig.source``: where the table was read) ends every error."""
    w = at(source)
    checked_table(table, _KEYS, "sync.training", source)
    for key in ("role_arn", "image_uri", "input_s3", "output_s3"):
        if not table.get(key):
            raise SyncConfigError(f"sync.training.{key}: required{w}")
    for key in ("input_s3", "output_s3"):
        try:
            split_s3(table[key])
        except ValueError as exc:
            raise SyncConfigError(f"sync.training.{key}: {exc}{w}") from exc
    for key, low in (("min_new_reviewed", 1), ("max_runtime_s", 60), ("volume_gb", 1)):
        if key in table and table[key] < low:
            raise SyncConfigError(f"sync.training.{key}: expected >= {low}, got {table[key]}{w}")
    if "propagate" in table and not 0 <= table["propagate"] <= 64:
        raise SyncConfigError(f"sync.training.propagate: expected dHash bits in 0..64, got {table['propagate']}{w}")
    if table.get("poll_interval", 0) < 0:
        raise SyncConfigError(f"sync.training.poll_interval: expected >= 0, got {table['poll_interval']}{w}")
    if table.get("endpoint_url") and (problem := endpoint_problem(table["endpoint_url"])):
        raise SyncConfigError(f"sync.training.endpoint_url: {problem}, got {table['endpoint_url']!r}{w}")
    sign_key = base / table["sign_key"] if table.get("sign_key") else None
    if sign_key is not None:
        # Read now: it was read only to sign the first bundle trained, after a paid job had run
        # for hours; a missing or wrong key then stopped the agent with nothing published.
        from .publish import load_private_key

        try:
            load_private_key(sign_key)
        except SyncConfigError as exc:
            raise SyncConfigError(f"sync.training.sign_key: {exc}{w}") from exc
    hp = {}
    for k, v in dict(table.get("hyperparameters", {})).items():
        if isinstance(v, dict) or isinstance(v, list):
            raise SyncConfigError(f"sync.training.hyperparameters.{k}: expected a plain value, got {v!r}{w}")
        hp[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    # Checked as the job will check them (it fails on an unknown key or a bad value): here, a
    # typo stops the agent at start instead of failing a paid job after its instance started.
    from exporter.sagemaker_entry import parse_hyperparameters

    try:
        parse_hyperparameters(hp)
    except ValueError as exc:
        raise SyncConfigError(f"sync.training.hyperparameters: {exc}{w}") from exc
    values = {k: v for k, v in table.items() if k not in ("hyperparameters", "sign_key")}
    if "poll_interval" in values:
        values["poll_interval"] = float(values["poll_interval"])
    values.setdefault("job_prefix", f"annotator-{appliance_id}"[:40])
    return TrainingSettings(appliance_id=appliance_id, hyperparameters=hp,
                            sign_key=sign_key, **values)
