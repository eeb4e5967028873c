"""Retraining as a SageMaker training job, started and followed by the sync agent.

::

    [sync.training]
    role_arn = "arn:aws:iam::123456789012:role/annotator-training"
    image_uri = "123456789012.dkr.ecr.eu-central-1.amazonaws.com/annotator:train"
    instance_type = "ml.g4dn.xlarge"
    input_s3 = "s3://edge-training/datasets"       # <input_s3>/<job name>/ receives the export
    output_s3 = "s3://edge-training/jobs"           # SageMaker writes <output_s3>/<job>/output/model.tar.gz
    min_new_reviewed = 200                          # start a job after this many newly reviewed images
    poll_interval = 300.0                           # seconds between describe_training_job calls
    max_runtime_s = 86400
    volume_gb = 30
    region = "eu-central-1"
    endpoint_url = "http://..."                     # optional: one endpoint for S3 and SageMaker (tests)
    [sync.training.hyperparameters]                 # passed as strings (exporter.sagemaker_entry)
    epochs = 30
    auto_weight = 0.5

``TrainingJobTask.run_once`` (a sync-agent task): with a job in flight it polls
``describe_training_job`` (at most every ``poll_interval``); ``Completed``: it downloads the
model artifact (``ModelArtifacts.S3ModelArtifacts``), unpacks it safely, verifies the bundle
(``load_bundle``) and publishes it to the ``[sync.models.registry]`` (``sync.publish``), where
the model pull picks it up; ``Failed``/``Stopped``: it logs SageMaker's ``FailureReason`` and
forgets the job. With no job in flight and enough newly reviewed images it exports the dataset
(``sync.coco_export``, hold-out left out), uploads it (and the bundle in use, with its
``weights/``, as the ``init`` channel) and calls ``create_training_job``. The
job in flight lives in ``<store root>/training-job.json`` (written atomically, its folder
fsynced), so a restart, or a power loss, resumes following it. The export and the artifact are
unpacked in ``training-export-*`` / ``training-artifact-*`` folders there; a kill -9 leaves
them, and the task's first pass removes them. Errors: boto3 failures become ``RetryableError`` / ``PermanentError``.

Exactly one job per start, through kill -9 and timeouts: the job's name (and its dataset
version and input addresses) is saved with status ``Starting`` *before* ``create_training_job``
is sent. A pass that finds a ``Starting`` job asks SageMaker for it by that name: known, it is
recorded ``InProgress`` and followed; unknown, it is created under the same name. SageMaker
answering ``ResourceInUse`` to the create means an earlier try got through: the job is
followed, not started again.

An artifact that is there but is not a usable bundle (not a readable tar.gz, no
``bundle.json``, checksums or layouts wrong, no artifact address at all) is refused: the
state is saved as ``ArtifactRefused`` with the reason, an error is logged and the agent goes
on with its other tasks (its dataset version is not trained again, like a failed job's).
Credentials rejected or a missing bucket still stop the agent and leave the job
``InProgress``, so it is followed again once they are fixed.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

from service.durable import write_json_atomic
from service.errors import BundleError

from .errors import BundleContentError, PermanentError, RetryableError, SyncConfigError
from .objectstore import ObjectStore
from .s3store import wrap_boto_error
from .training_settings import TrainingSettings, split_s3

log = logging.getLogger(__name__)

STATE_FILE = "training-job.json"
STARTING, IN_PROGRESS, ARTIFACT_REFUSED = "Starting", "InProgress", "ArtifactRefused"
EXPORT_PREFIX, ARTIFACT_PREFIX = "training-export-", "training-artifact-"
# What tempfile.TemporaryDirectory names with those prefixes: the prefix and 8 random characters.
_TEMP_NAME = re.compile(rf"(?:{EXPORT_PREFIX}|{ARTIFACT_PREFIX})[a-z0-9_]{{8}}")


def _error_code(exc: BaseException) -> tuple[str, str]:
    """botocore ``ClientError``'s (code, message); empty strings for any other exception."""
    err = getattr(exc, "response", None)
    err = err.get("Error", {}) if isinstance(err, dict) else {}
    return str(err.get("Code", "")), str(err.get("Message", ""))


class CloudTrainer:
    """create / describe / fetch for one configured SageMaker setup. ``sagemaker`` and ``s3``
    are boto3 clients; ``open_store(uri)`` opens an ``ObjectStore`` for an ``s3://`` prefix."""

    def __init__(self, settings: TrainingSettings, sagemaker: Any, s3: Any,
                 open_store: Callable[[str], ObjectStore]) -> None:
        self.settings = settings
        self.sagemaker = sagemaker
        self.s3 = s3
        self.open_store = open_store

    def upload_folder(self, folder: Path, name: str) -> str:
        """Copy a folder (an exported dataset, a bundle) to ``<input_s3>/<name>/``; returns that address."""
        uri = f"{self.settings.input_s3.rstrip('/')}/{name}"
        store = self.open_store(uri)
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        for path in files:
            store.put(path.relative_to(folder).as_posix(), path)
        log.info("uploaded %d files of %s to %s", len(files), folder, uri)
        return uri + "/"

    def start(self, job_name: str, input_uri: str, init_uri: str | None = None) -> str:
        """``create_training_job`` with the ``training`` channel at ``input_uri`` (and the ``init``
        channel, the bundle to continue from, at ``init_uri``); returns the job's ARN."""
        s = self.settings
        channels = [("training", input_uri)] + ([("init", init_uri)] if init_uri else [])
        request = {
            "TrainingJobName": job_name,
            "AlgorithmSpecification": {"TrainingImage": s.image_uri, "TrainingInputMode": "File"},
            "RoleArn": s.role_arn,
            "HyperParameters": {k: str(v) for k, v in s.hyperparameters.items()},
            "InputDataConfig": [{"ChannelName": name, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
                for name, uri in channels],
            "OutputDataConfig": {"S3OutputPath": s.output_s3},
            "ResourceConfig": {"InstanceType": s.instance_type, "InstanceCount": 1, "VolumeSizeInGB": s.volume_gb},
            "StoppingCondition": {"MaxRuntimeInSeconds": s.max_runtime_s},
            "Tags": [{"Key": "annotator:appliance", "Value": s.appliance_id}],
        }
        try:
            arn = self.sagemaker.create_training_job(**request)["TrainingJobArn"]
        except Exception as exc:  # botocore errors, sorted by wrap_boto_error
            if _error_code(exc)[0] == "ResourceInUse":
                # Names are unique per account and region, and this name is this appliance's:
                # an earlier try (its answer lost to a timeout or a crash) created it.
                log.info("training job %s exists already (an earlier try got through); following it", job_name)
                return str(self.describe(job_name).get("TrainingJobArn", ""))
            raise wrap_boto_error(exc, "sagemaker", f"create_training_job {job_name}") from exc
        log.info("started training job %s (%s)", job_name, arn)
        return str(arn)

    def describe(self, job_name: str) -> dict[str, Any]:
        try:
            return dict(self.sagemaker.describe_training_job(TrainingJobName=job_name))
        except Exception as exc:  # botocore errors
            raise wrap_boto_error(exc, "sagemaker", f"describe_training_job {job_name}") from exc

    def find(self, job_name: str) -> dict[str, Any] | None:
        """``describe`` of a job that may not exist: None when SageMaker does not know the name
        (``ValidationException`` "Requested resource not found"; moto: "Could not find ...")."""
        try:
            return dict(self.sagemaker.describe_training_job(TrainingJobName=job_name))
        except Exception as exc:  # botocore errors
            code, message = _error_code(exc)
            text = message.lower()
            if code == "ResourceNotFound" or (code == "ValidationException"
                                              and ("not found" in text or "could not find" in text)):
                return None
            raise wrap_boto_error(exc, "sagemaker", f"describe_training_job {job_name}") from exc

    def fetch_bundle(self, artifact_uri: str, dest: Path) -> Path:
        """Download and unpack ``model.tar.gz`` into ``dest``; returns the verified bundle folder.

        ``BundleContentError`` when the artifact is not a usable bundle (module doc); store
        errors as ``wrap_boto_error`` sorts them; a missing artifact is ``RetryableError``."""
        try:
            bucket, key = split_s3(artifact_uri)
        except ValueError as exc:
            raise BundleContentError(f"training job reported no usable model artifact address: {exc}") from exc
        dest.mkdir(parents=True, exist_ok=True)
        tar_path = dest / "model.tar.gz"
        try:
            self.s3.download_file(bucket, key, str(tar_path))
        except Exception as exc:  # botocore errors; a missing artifact is worth another try
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise RetryableError(f"model artifact {artifact_uri} is not there (yet)") from exc
            raise wrap_boto_error(exc, bucket, f"get {key}", "[sync.training] output_s3") from exc
        unpacked = dest / "bundle"
        try:
            with tarfile.open(tar_path) as t:
                t.extractall(unpacked, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:  # EOFError: truncated
            raise BundleContentError(f"model artifact {artifact_uri} is not a readable tar.gz: {exc}") from exc
        except OSError as exc:  # the local disk (full, not writable), not the artifact
            raise RetryableError(f"model artifact {artifact_uri}: cannot unpack it under {dest}: {exc}") from exc
        unpacked.mkdir(exist_ok=True)  # an empty archive creates nothing
        for cand in (unpacked, *sorted(p for p in unpacked.iterdir() if p.is_dir())):
            if (cand / "bundle.json").is_file():
                from .publish import bundle_files

                try:  # what publish_bundle checks: checksums, layouts, lineage.weights
                    bundle_files(cand)
                except (BundleError, PermanentError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise BundleContentError(f"model artifact {artifact_uri} is not a usable bundle: {exc}") from exc
                return cand
        raise BundleContentError(f"model artifact {artifact_uri} holds no bundle.json")


class TrainingJobTask:
    """The agent task (module doc). ``export_dataset(folder) -> (version, reviewed count)``
    writes the current dataset; ``registry`` is where finished bundles are published;
    ``current_bundle()`` is the bundle in use (sent as the ``init`` channel, so the job
    continues from its weights), or None. Runs at most once per ``poll_interval``."""

    name = "training"

    def __init__(self, trainer: CloudTrainer, registry: ObjectStore, state_dir: Path,
                 export_dataset: Callable[[Path], tuple[str, int]], sign_key: Path | None = None,
                 current_bundle: Callable[[], Path | None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.trainer = trainer
        self.registry = registry
        self.state_path = Path(state_dir) / STATE_FILE
        self.export_dataset = export_dataset
        self.sign_key = sign_key
        self.current_bundle = current_bundle
        self.clock = clock
        self._next_poll = 0.0
        self._swept = False

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        # sync_dir: the rename survives a power loss too. ``Starting`` is saved right before
        # create_training_job; rolled back to the old state, a second paid job would start.
        write_json_atomic(self.state_path, state, sync_dir=True)

    def remove_stale_temp(self) -> list[str]:
        """Remove the temporary export and artifact folders a killed earlier process left next
        to the state file (a ``TemporaryDirectory`` there is removed only when its block ends;
        a dataset export is as large as the reviewed images). Only names ``tempfile`` made
        with this task's prefixes; run before this process makes any. Returns the names."""
        removed = []
        for path in sorted(self.state_path.parent.glob("training-*")):
            if _TEMP_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        if removed:
            log.info("removed %d temporary folders left by an earlier run: %s", len(removed), ", ".join(removed))
        return removed

    def run_once(self) -> bool:
        if not self._swept:  # the first pass, not construction: building the task writes nothing
            self._swept = True
            self.remove_stale_temp()
        now = self.clock()
        interval = self.trainer.settings.poll_interval
        if now < self._next_poll - interval:
            # The next poll is further off than an interval: the wall clock stepped back since
            # the last one. Poll now rather than wait out the step (hours without a look).
            log.warning("the clock stepped back %.0f s since the last training job poll; polling now",
                        self._next_poll - interval - now)
        elif now < self._next_poll:
            return False
        self._next_poll = now + interval
        state = self.state()
        if state.get("job") and state.get("status") == IN_PROGRESS:
            return self.follow(state)
        if state.get("job") and state.get("status") == STARTING:
            return self.resume_start(state)
        return self.maybe_start(state)

    def maybe_start(self, state: dict[str, Any]) -> bool:
        """Export, upload and start a job when enough new reviewed images arrived since the last
        completed job (a failed job's dataset version is not tried again)."""
        s = self.trainer.settings
        base = int(state.get("reviewed_base", 0))
        with tempfile.TemporaryDirectory(prefix=EXPORT_PREFIX, dir=self.state_path.parent) as tmp:
            version, reviewed = self.export_dataset(Path(tmp) / "dataset")
            if reviewed - base < s.min_new_reviewed or version == state.get("dataset_version"):
                return False
            job = f"{s.job_prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(self.clock()))}"[:63]
            input_uri = self.trainer.upload_folder(Path(tmp) / "dataset", job)
        current = self.current_bundle()
        init_uri = self.trainer.upload_folder(current, f"{job}-init") if current is not None else None
        # Saved before the create call (module doc): a crash or a lost answer after SageMaker
        # accepted the job must find this name, not start a second, paid-for job.
        starting = {"job": job, "status": STARTING, "dataset_version": version, "reviewed_at_start": reviewed,
                    "reviewed_base": base, "started": self.clock(), "input": input_uri, "init": init_uri}
        self._save(starting)
        return self._create(starting)

    def _create(self, state: dict[str, Any]) -> bool:
        """``create_training_job`` for the saved ``Starting`` state, then record it InProgress."""
        arn = self.trainer.start(state["job"], state["input"], state.get("init"))
        self._save({**state, "arn": arn, "status": IN_PROGRESS})
        self._next_poll = 0.0
        return True

    def resume_start(self, state: dict[str, Any]) -> bool:
        """A job saved as ``Starting`` whose create call may or may not have reached SageMaker:
        follow it when SageMaker knows it, create it under the same name when not."""
        desc = self.trainer.find(state["job"])
        if desc is None:
            log.info("training job %s was saved but never reached SageMaker; creating it now", state["job"])
            return self._create(state)
        log.info("training job %s was started by an earlier try; following it", state["job"])
        self._save({**state, "arn": str(desc.get("TrainingJobArn", "")), "status": IN_PROGRESS})
        self._next_poll = 0.0
        return True

    def follow(self, state: dict[str, Any]) -> bool:
        """Poll the job in flight; publish its bundle when it completed."""
        desc = self.trainer.describe(state["job"])
        status = str(desc.get("TrainingJobStatus"))
        if status in ("InProgress", "Stopping"):
            return False
        if status != "Completed":
            log.error("training job %s ended %s: %s", state["job"], status, desc.get("FailureReason", "no reason given"))
            self._save({**state, "status": status, "failure": str(desc.get("FailureReason", ""))})
            return True
        artifact = str((desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts", ""))
        from .publish import publish_bundle

        with tempfile.TemporaryDirectory(prefix=ARTIFACT_PREFIX, dir=self.state_path.parent) as tmp:
            try:
                bundle_dir = self.trainer.fetch_bundle(artifact, Path(tmp))
            except BundleContentError as exc:  # fetch_bundle sorts BundleError there too
                # The artifact's content, not the access to it: refuse it and let the agent go on
                # (credential and bucket errors, other PermanentErrors, still stop it; module doc).
                log.error("training job %s: model artifact refused, nothing published: %s", state["job"], exc)
                self._save({**state, "status": ARTIFACT_REFUSED, "artifact": artifact, "failure": str(exc)})
                return True
            result = publish_bundle(bundle_dir, self.registry, sign_key=self.sign_key)
        self._save({**state, "status": "Completed", "artifact": artifact, "bundle_id": result.bundle_id,
                    "reviewed_base": state.get("reviewed_at_start", 0)})
        log.info("training job %s: bundle %s published to %r", state["job"], result.bundle_id, self.registry)
        return True


def build_training_task(settings: TrainingSettings, registry: ObjectStore, state_dir: Path,
                        export_dataset: Callable[[Path], tuple[str, int]],
                        current_bundle: Callable[[], Path | None] = lambda: None) -> TrainingJobTask:
    """The task with boto3 clients for ``settings`` (credentials from boto3's chain)."""
    import boto3

    from .publish import open_registry

    if not settings.role_arn or not settings.image_uri:
        raise SyncConfigError("sync.training: role_arn and image_uri are required")
    from botocore.config import Config

    session = boto3.session.Session(region_name=settings.region)
    sagemaker = session.client("sagemaker", endpoint_url=settings.endpoint_url)
    s3 = session.client("s3", endpoint_url=settings.endpoint_url,
                        config=Config(s3={"addressing_style": "path"}) if settings.endpoint_url else None)

    def open_store(uri: str) -> ObjectStore:
        return open_registry(uri, endpoint_url=settings.endpoint_url, region=settings.region,
                             setting="[sync.training] input_s3")  # only the dataset and start bundle go up

    trainer = CloudTrainer(settings, sagemaker, s3, open_store)
    return TrainingJobTask(trainer, registry, state_dir, export_dataset, sign_key=settings.sign_key,
                           current_bundle=current_bundle)


def dataset_exporter(store: Any, dataset: Any, propagate: int | None = None) -> Callable[[Path], tuple[str, int]]:
    """``export_dataset`` for the task: auto-accepted images merged, then ``export_dataset``
    (with ``propagate``: ``sync.propagate`` at that many dHash bits)."""
    from .coco_export import export_dataset
    from .merge import Merger

    def export(out: Path) -> tuple[str, int]:
        added = Merger(store, dataset).add_auto_accepted()
        # Every time (a no-op when nothing changed): the export's version, which the bundle's
        # lineage names, must have its row even after a kill between earlier writes and their record.
        dataset.record_version(f"{added} auto-accepted images added before a training job")
        res = export_dataset(dataset, store.image_path, out, row_of=store.get, propagate_distance=propagate)
        return res.version, res.reviewed

    return export


__all__ = ["CloudTrainer", "TrainingJobTask", "build_training_task", "dataset_exporter"]
