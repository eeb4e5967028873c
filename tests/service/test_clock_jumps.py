"""Wall-clock steps (NTP, a box booted without an RTC, an operator's ``date``) while the daemon
runs or between a kill and a restart: leases, retention."""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import pytest

from procs import FakeClock
from service.config import RetentionConfig
from service.retention import DAY, RetentionTask, run_pass
from service import store as store_module
from service.store import Store, image_id_of

CLOCK_STEP_SLACK = getattr(store_module, "CLOCK_STEP_SLACK", 300.0)

T0 = 1_800_000_000.0
HOUR = 3600.0


def _record() -> dict:
    return {"width": 64, "height": 48, "heads": [], "persons": []}


def _task(store: Store, settings: RetentionConfig, mono: FakeClock) -> RetentionTask:
    """The daemon's retention thread's task, on a fake monotonic clock (where it reads one)."""
    takes = "monotonic" in inspect.signature(RetentionTask).parameters
    return RetentionTask(store, settings, None, **({"monotonic": mono} if takes else {}))


def _pass_now(task: RetentionTask) -> float:
    """The time the daemon's pass runs by (before the fix: the store's wall clock)."""
    return task.pass_time() if hasattr(task, "pass_time") else task.store.clock()


def _accepted(store: Store, data: bytes) -> str:
    image_id, _ = store.ingest(data, "test")
    [row] = store.claim("w", limit=1)
    store.complete(row.image_id, "w", _record(), "b1", "auto_accepted", 0.9, [], audit=False)
    return image_id


def test_a_killed_workers_leases_are_taken_over_soon_after_the_clock_steps_back(tmp_path: Path, caplog) -> None:
    clock = FakeClock(T0)
    store = Store(tmp_path / "store", lease_seconds=60, clock=clock)
    image_id, _ = store.ingest(b"frame", "test")
    assert [r.image_id for r in store.claim("dead-daemon")] == [image_id]  # then killed
    store.close()
    clock.t -= 5 * HOUR  # NTP steps the clock back before the restart
    restarted = Store(tmp_path / "store", lease_seconds=60, clock=clock)
    try:
        clock.t += 60 + CLOCK_STEP_SLACK + 1  # waits at most a lease and the slack, not 5 hours
        with caplog.at_level(logging.WARNING, logger="service.store"):
            rows = restarted.claim("new-daemon")
        assert [r.image_id for r in rows] == [image_id]
        assert "stepped back" in caplog.text
        # done once: the dead owner's late completion is refused, the new owner's accepted
        with pytest.raises(Exception):
            restarted.complete(image_id, "dead-daemon", _record(), "b1", "auto_accepted", 0.9, [], audit=False)
        restarted.complete(image_id, "new-daemon", _record(), "b1", "auto_accepted", 0.9, [], audit=False)
        assert restarted.get(image_id).state == "auto_accepted"
    finally:
        restarted.close()


def test_a_live_batch_renews_its_lease_right_after_the_clock_steps_back(tmp_path: Path) -> None:
    """A worker inside a long batch renewed only when the wall clock came back to the old
    renewal time: after a step back of more than the slack, another worker took its batch over
    (inferred twice, completed once)."""
    from service.daemon import _BatchLease

    clock = FakeClock(T0)
    store = Store(tmp_path / "store", lease_seconds=60, clock=clock)
    try:
        store.ingest(b"frame", "test")
        lease = _BatchLease(store, "worker", store.claim("worker"))
        clock.t -= 2 * HOUR
        assert lease.keep() == lease.image_ids  # renewed at once: ends a lease from the new now
        assert store.get(lease.image_ids[0]).lease_expires == clock.t + 60
        clock.t += 60 + CLOCK_STEP_SLACK - 1
        assert lease.keep() == lease.image_ids and store.claim("other") == []
    finally:
        store.close()


def test_a_lease_is_not_taken_over_for_a_small_step_back(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    store = Store(tmp_path / "store", lease_seconds=60, clock=clock)
    try:
        store.ingest(b"frame", "test")
        assert len(store.claim("a")) == 1
        clock.t -= 120  # a small NTP correction: the live holder keeps its batch
        assert store.claim("b") == []
    finally:
        store.close()


def test_a_forward_step_of_a_year_while_the_daemon_runs_removes_nothing_early(tmp_path: Path, caplog) -> None:
    clock, mono = FakeClock(T0), FakeClock(1000.0)
    store = Store(tmp_path / "store", clock=clock)
    try:
        young = _accepted(store, b"accepted today")
        task = _task(store, RetentionConfig(auto_image_days=30), mono)
        run_pass(store, task.settings, None, now=_pass_now(task))
        clock.t += 365 * DAY  # an operator's `date` (or a bad NTP server) a year ahead
        mono.t += 600
        with caplog.at_level(logging.WARNING, logger="service.retention"):
            report = run_pass(store, task.settings, None, now=_pass_now(task))
        assert report.auto_images is not None and report.auto_images.files == 0
        assert store.image_bytes(young) == b"accepted today"
        assert "stepped" in caplog.text and "forward" in caplog.text
        # real days go on counting from the clock before the step
        clock.t += 31 * DAY
        mono.t += 31 * DAY
        report = run_pass(store, task.settings, None, now=_pass_now(task))
        assert report.auto_images.files == 1
    finally:
        store.close()


def test_a_step_forward_taken_back_by_ntp_and_a_clock_set_at_boot_are_believed(tmp_path: Path) -> None:
    clock, mono = FakeClock(T0), FakeClock(1000.0)
    store = Store(tmp_path / "store", clock=clock)
    try:
        task = RetentionTask(store, RetentionConfig(auto_image_days=30), None, monotonic=mono)
        assert task.pass_time() == T0
        clock.t += 100 * DAY
        mono.t += 60
        assert task.pass_time() == T0 + 60
        clock.t = T0 + 120  # NTP puts it right
        mono.t += 60
        assert task.pass_time() == T0 + 120
        boot = RetentionTask(store, RetentionConfig(auto_image_days=30), None, monotonic=mono)
        clock.t = 86400.0  # booted in 1970, no RTC battery
        assert boot.pass_time() == 86400.0
        clock.t, mono.t = T0, mono.t + 60  # NTP sets the clock
        assert boot.pass_time() == T0
    finally:
        store.close()


def test_a_processed_copy_with_an_mtime_in_the_future_goes_by_its_rows_age(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    store = Store(tmp_path / "store", clock=clock)
    try:
        drop = tmp_path / "drop"
        copy = drop / "processed" / "cam1" / "a.jpg"
        copy.parent.mkdir(parents=True)
        copy.write_bytes(b"from a camera with its clock 5 years ahead")
        future = T0 + 5 * 365 * DAY
        os.utime(copy, (future, future))
        _accepted(store, copy.read_bytes())
        clock.t += 10 * DAY
        report = run_pass(store, RetentionConfig(processed_days=7), drop)
        assert report.processed is not None and report.processed.files == 1
        assert not copy.exists()
        assert store.image_bytes(image_id_of(b"from a camera with its clock 5 years ahead"))
    finally:
        store.close()


def test_the_training_job_is_still_polled_after_the_clock_steps_back(tmp_path: Path) -> None:
    import json
    from types import SimpleNamespace

    from sync.training_job import STATE_FILE, TrainingJobTask

    polls: list[str] = []

    class Trainer:
        settings = SimpleNamespace(poll_interval=300.0)

        def describe(self, job: str) -> dict:
            polls.append(job)
            return {"TrainingJobStatus": "InProgress"}

    (tmp_path / STATE_FILE).write_text(json.dumps({"job": "annotator-1", "status": "InProgress"}))
    clock = FakeClock(T0)
    task = TrainingJobTask(Trainer(), None, tmp_path, lambda out: ("v", 0), clock=clock)  # type: ignore[arg-type]
    task.run_once()
    clock.t += 100
    task.run_once()  # within the interval: no call
    assert polls == ["annotator-1"]
    clock.t -= 6 * HOUR  # NTP steps the clock back: the next poll is not 6 hours away
    clock.t += 1
    task.run_once()
    assert polls == ["annotator-1", "annotator-1"]
