"""Metrics scraped from the real HTTP endpoint on loopback and parsed as exposition text."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import MetricsRecorder, start_metrics_server
from service.store import STATES, Store


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def served(tmp_path: Path) -> tuple[MetricsRecorder, Store, int]:
    store = Store(tmp_path / "store", lease_seconds=5.0)
    metrics = MetricsRecorder()
    metrics.watch_store(store)
    port = start_metrics_server(metrics, "127.0.0.1", 0)
    return metrics, store, port


def test_scrape_reports_every_series(served: tuple[MetricsRecorder, Store, int]) -> None:
    metrics, store, port = served
    store.ingest(b"first image bytes", "drop/a.jpg")
    store.ingest(b"second image bytes", "drop/b.jpg")
    metrics.bundle("20261124-abc123", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    for seconds in (0.004, 0.03, 0.03):
        metrics.observe_inference("pose_main", seconds)
    with metrics.time_inference("head"):
        pass
    metrics.upload(ok=True)
    metrics.upload(ok=True)
    metrics.upload(ok=False)
    metrics.retry()
    metrics.review_merged(7)
    metrics.queue_depth("merge", 3)

    got = scrape(port)
    assert got[("annotator_images", (("state", "received"),))] == 2
    assert all(("annotator_images", (("state", s),)) in got for s in STATES)
    assert got[("annotator_queue_depth", (("queue", "annotate"),))] == 2
    assert got[("annotator_queue_depth", (("queue", "upload"),))] == 0
    assert got[("annotator_queue_depth", (("queue", "merge"),))] == 3
    assert got[("annotator_paused", ())] == 0
    assert got[("annotator_bundle_info", (("bundle_id", "20261124-abc123"), ("providers", "CUDAExecutionProvider,CPUExecutionProvider")))] == 1
    assert got[("annotator_inference_seconds_count", (("role", "pose_main"),))] == 3
    assert got[("annotator_inference_seconds_bucket", (("le", "0.005"), ("role", "pose_main")))] == 1
    assert got[("annotator_inference_seconds_sum", (("role", "pose_main"),))] == pytest.approx(0.064)
    assert got[("annotator_inference_seconds_count", (("role", "head"),))] == 1
    assert got[("annotator_uploads_total", (("result", "ok"),))] == 2
    assert got[("annotator_uploads_total", (("result", "failed"),))] == 1
    assert got[("annotator_upload_retries_total", ())] == 1
    assert got[("annotator_reviews_merged_total", ())] == 7
    assert got[("annotator_retention_removed_files_total", (("rule", "processed"),))] == 0  # present from the start
    metrics.retention_removed("auto_images", 3, 300_000)

    store.ingest(b"third image bytes", "drop/c.jpg")  # read again at the next scrape
    metrics.bundle("20261125-def456", ["CPUExecutionProvider"])
    got = scrape(port)
    assert got[("annotator_images", (("state", "received"),))] == 3
    assert got[("annotator_retention_removed_bytes_total", (("rule", "auto_images"),))] == 300_000
    assert ("annotator_bundle_info", (("bundle_id", "20261124-abc123"), ("providers", "CUDAExecutionProvider,CPUExecutionProvider"))) not in got
    assert got[("annotator_bundle_info", (("bundle_id", "20261125-def456"), ("providers", "CPUExecutionProvider")))] == 1


def test_paused_store_and_closed_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", min_free_bytes=1 << 62)  # no disk is that large: paused
    metrics = MetricsRecorder()
    metrics.watch_store(store)
    port = start_metrics_server(metrics, "127.0.0.1", 0)
    assert scrape(port)[("annotator_paused", ())] == 1
    store.close()
    assert ("annotator_paused", ()) in scrape(port)  # last values stay; the scrape still works


def test_recorders_are_independent() -> None:
    a, b = MetricsRecorder(), MetricsRecorder()
    a.retry()
    assert a.registry.get_sample_value("annotator_upload_retries_total") == 1
    assert b.registry.get_sample_value("annotator_upload_retries_total") == 0
    with pytest.raises(ValueError):
        a.review_merged(-1)


def test_scrapes_leave_no_database_connections_behind(served: tuple[MetricsRecorder, Store, int]) -> None:
    """Each scrape is answered on a new thread, which opened its own store connection: one open
    connection (two file descriptors) per scrape, for ever (about 650 MB a day at 15 s)."""
    _, store, port = served
    for _ in range(30):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert store._conns.open_count() <= 3  # this thread's, and a scrape thread or two not yet gone
