"""Ground Truth images that a labeling job ended without labelling: who sends them again, and
what is said (a job stopped on purpose; jobs started on the cloud side)."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest

pytest.importorskip("botocore")

from gtworker import answer, output_line  # noqa: E402
from s3servers import S3Server  # noqa: E402
from service.keypoints import CABIN19_NAMES  # noqa: E402
from service.store import REVIEWED, UPLOADED  # noqa: E402
from sync.config import load_sync_config  # noqa: E402
from sync.errors import SyncConfigError  # noqa: E402
from sync.groundtruth import OUTPUT_MANIFEST, GroundTruthBackend, job_name_for, manifest_line  # noqa: E402
from sync.merge import MergeReport, Merger, MergeTask  # noqa: E402
from sync.objectstore import LocalFolderStore  # noqa: E402
from sync.agent import Agent  # noqa: E402
from sync.review_settings import review_settings_from  # noqa: E402
from sync.submit import ReviewSubmitTask  # noqa: E402
from test_groundtruth_jobs import PREFIX, SPEC, World, person  # noqa: E402


class StopWorld(World):
    """``World`` whose agent may be (re)started with ``resubmit_stopped``."""

    resubmit_stopped = False

    def start(self) -> None:
        self.backend = GroundTruthBackend(self.bucket, appliance_id="box-1", job=SPEC, sagemaker_client=self.sagemaker,
                                          **({"resubmit_stopped": True} if self.resubmit_stopped else {}))
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.bucket, self.backend,
                                       reconcile_interval=0.0)
        merge = MergeTask(Merger(self.store, self.dataset), self.backend.collect, on_report=self.report)
        self.agent = Agent([self.submit, merge], fault_base=0.0)


@pytest.fixture
def world(moto_server: S3Server, tmp_path: Path) -> Iterator[StopWorld]:
    w = StopWorld(moto_server, tmp_path, images=5)
    yield w
    w.close()


def test_a_job_its_user_stopped_is_not_paid_again_on_its_own_it_is_said_with_the_setting(
        world: StopWorld, caplog: pytest.LogCaptureFixture) -> None:
    """StopLabelingJob by a person (one image labelled, one task expired, three never shown):
    the agent started a paid ``-retry`` job on the other four by itself. Now they are said once,
    with the setting that sends them; with it (and a restart) they go, once, in ``-retry``."""
    w = world
    a, b, c, d, e = w.ids
    job, retry = job_name_for(PREFIX, w.batch), job_name_for(PREFIX, w.batch + "-retry")
    w.passes()
    w.end(job, "Stopped", labelled=[a], expired=[b])
    caplog.set_level(logging.WARNING)
    w.passes(4)
    assert w.sagemaker.created == [job]  # no second, paid job
    assert w.state(a) == REVIEWED and all(w.state(i) == UPLOADED for i in (b, c, d, e))
    assert set(w.backend.stuck) == {b, c, d, e}
    said = [r.getMessage() for r in caplog.records if "resubmit_stopped = true" in r.getMessage()]
    assert len(said) == 1 and job in said[0] and retry in said[0] and "Stopped" in said[0], said
    # the user asks for them: the setting, a restart
    w.resubmit_stopped = True
    w.start()
    w.passes()
    assert w.sagemaker.created == [job, retry]
    assert set(w.input_lines(retry)) == {b, c, d, e}
    w.end(retry, "Completed", labelled=[b, c, d, e])
    w.passes()
    assert all(w.state(i) == REVIEWED for i in w.ids)


def test_a_failed_job_and_expired_tasks_still_go_to_review_again_on_their_own(world: StopWorld) -> None:
    """Only a person's Stop ends a batch's review: a Completed job with an expired task keeps
    the automatic retry."""
    w = world
    a, b, *_ = w.ids
    job, retry = job_name_for(PREFIX, w.batch), job_name_for(PREFIX, w.batch + "-retry")
    w.passes()
    w.end(job, "Completed", labelled=[i for i in w.ids if i != b], expired=[b])
    w.passes()
    assert w.sagemaker.created == [job, retry] and set(w.input_lines(retry)) == {b}


def _settings(tmp_path: Path, extra: str):
    config = tmp_path / "annotator.toml"
    config.write_text('[sync.target]\nkind = "s3"\nbucket = "bkt"\n[sync.review]\nkind = "groundtruth"\n'
                      f'[sync.review.groundtruth]\n{extra}')
    return review_settings_from(load_sync_config(config, env={}), env={})


def test_resubmit_stopped_is_a_checked_setting(tmp_path: Path) -> None:
    assert _settings(tmp_path, "").groundtruth.resubmit_stopped is False
    assert _settings(tmp_path, "resubmit_stopped = true\n").groundtruth.resubmit_stopped is True
    with pytest.raises(SyncConfigError, match="groundtruth.resubmit_stopped: expected true or false"):
        _settings(tmp_path, 'resubmit_stopped = "yes"\n')


class CloudSideWorld(World):
    """``World`` whose jobs are started on the cloud side: no spec, no SageMaker client."""

    days = 0.0

    def start(self) -> None:
        self.backend = GroundTruthBackend(self.bucket, appliance_id="box-1")
        self.backend.clock = lambda: time.time() + self.days * 86400
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.bucket, self.backend,
                                       reconcile_interval=0.0)
        merge = MergeTask(Merger(self.store, self.dataset), self.backend.collect, on_report=self.report)
        self.agent = Agent([self.submit, merge], fault_base=0.0)

    def cloud_job(self, job: str, labelled: Sequence[str]) -> None:
        """The cloud side ran ``job`` on the batch's manifest and it ended labelling ``labelled``."""
        key = self.backend.manifest_key(self.batch)
        lines = {(line := json.loads(t))["image-id"]: line for t in self.bucket.get(key).decode().splitlines() if t}
        out = [output_line(lines[i], answer(((10.0, 5.0, 30.0, 25.0),), [person()], CABIN19_NAMES, (64, 48)), job)
               for i in labelled]
        self.bucket.put(f"groundtruth/output/{job}/{OUTPUT_MANIFEST}",
                        b"".join(json.dumps(line).encode() + b"\n" for line in out))


def test_images_a_cloud_side_job_did_not_label_are_said_once_with_their_manifest(
        moto_server: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No SageMaker client (the cloud side starts the jobs): the images a job ended without
    were resubmitted by nothing and said by nothing, for ever. Now, once their batch is older
    than a task can stay available, they are said (once), naming the batch's manifest; nothing
    is sent again, nothing else is touched."""
    w = CloudSideWorld(moto_server, tmp_path, images=5)
    try:
        a, b, c, d, e = w.ids
        w.passes()
        w.cloud_job("cloud-started-job-1", [a, b, c])
        caplog.set_level(logging.WARNING)
        w.passes()
        assert [w.state(i) for i in w.ids] == [REVIEWED] * 3 + [UPLOADED] * 2
        assert w.backend.stuck == {}  # a day old: its job may still run
        w.days = 31.0
        w.passes(3)
        assert set(w.backend.stuck) == {d, e}
        said = [r.getMessage() for r in caplog.records if "labelled in no output manifest" in r.getMessage()]
        assert len(said) == 1 and w.backend.manifest_key(w.batch) in said[0] and "cloud side" in said[0], said
        assert w.bucket.head(w.backend.manifest_key(w.batch + "-retry")) is None  # nothing sent again
        # a later job labels them: no longer said as waiting
        w.cloud_job("cloud-started-job-2", [d, e])
        w.passes(3)
        assert all(w.state(i) == REVIEWED for i in w.ids)
    finally:
        w.close()


def test_the_collector_forgets_the_manifests_that_left_the_bucket(tmp_path: Path) -> None:
    """The settled set kept every output manifest the process ever read (164 bytes a job,
    measured over 1,000 jobs); with a lifecycle rule on the output prefix it now follows the
    bucket, and a settled manifest still there is not read again."""
    store = LocalFolderStore(tmp_path / "bucket")
    gt = GroundTruthBackend(store, appliance_id="box-1", output_prefix="groundtruth/output")
    record = {"width": 64, "height": 48, "heads": [{"box": [10, 5, 30, 25], "conf": 0.9}], "persons": []}
    content = answer(((10.0, 5.0, 30.0, 25.0),), [person()], CABIN19_NAMES, (64, 48))
    reads = []
    real_get = store.get
    store.get = lambda key, *a: (reads.append(key), real_get(key, *a))[1]  # type: ignore[method-assign]
    for n in range(40):
        job = f"job-{n:04d}"
        image_id = f"{n:064x}"
        line = json.loads(manifest_line(f"s3://bkt/images/{image_id}.jpg", image_id, record, "b1"))
        store.put(f"groundtruth/output/{job}/{OUTPUT_MANIFEST}", json.dumps(output_line(line, content, job)).encode())
        labels = list(gt.collect())
        assert [label.image_id for label in labels] == [image_id]
        gt.merged(MergeReport(merged=[image_id]))
        if n >= 5:  # the lifecycle rule: jobs older than five are deleted
            shutil.rmtree(tmp_path / "bucket" / "groundtruth" / "output" / f"job-{n - 5:04d}")
    reads.clear()
    assert list(gt.collect()) == [] and reads == []  # settled: not read again
    assert len(gt._done) <= 6


def test_a_batch_named_by_a_clock_40_days_behind_is_not_said_old_at_once(moto_server: S3Server) -> None:
    """A box without a battery clock boots 40 days behind and makes a batch before NTP sets the
    time: the batch id (this box's clock) says 40 days, and its images were said to "wait for
    review for good" at once (helper clock audit). The manifest's time in the bucket decides."""
    import datetime as dt
    from types import SimpleNamespace

    from sync.s3store import S3Store

    bucket = S3Store(moto_server.new_bucket(), "edge", client=moto_server.client())
    backend = GroundTruthBackend(bucket, appliance_id="box-1")
    batch = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)).strftime("%Y%m%dT%H%M%SZ") + "-0001"
    bucket.put(backend.manifest_key(batch), b'{"source-ref": "s3://x/y.jpg", "image-id": "aa"}\n')
    items = [SimpleNamespace(image_id="aa" * 32, batch_id=batch)]
    assert backend.missing_items(items) == set() and backend.stuck == {}  # HEAD: said at once
    backend.clock = lambda: time.time() + 31 * 86400  # a month on, with the clock right
    backend.missing_items(items)
    assert set(backend.stuck) == {"aa" * 32}
