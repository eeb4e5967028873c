"""``build_agent`` from one shared TOML file: the example's [sync] part, review settings, the
submit task's exactly-once record, metrics, and the daemon's tables read the daemon's way."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from reviewdata import fill_store
from service.metrics import MetricsRecorder
from sync.agent import Every, build_agent
from sync.config import _SYNC_KEYS, _TARGET_KEYS, load_sync_config
from sync.errors import SyncConfigError
from sync.journal import Journal
from sync.pull_settings import _DATASET_KEYS, _MODELS_KEYS, _REGISTRY_KEYS
from sync.review import InMemoryReviewBackend
from sync.review_settings import _GT_KEYS, _JOB_TYPES, _LS_KEYS, _REVIEW_KEYS, TOKEN_ENV, review_settings_from
from sync.submit import ReviewSubmitTask
from sync.uploader import Uploader, UploadSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "annotator.example.toml"
TABLES = {"sync": _SYNC_KEYS, "sync.target": _TARGET_KEYS, "sync.review": _REVIEW_KEYS,
          "sync.review.groundtruth": _GT_KEYS, "sync.review.groundtruth.job": _JOB_TYPES,
          "sync.review.labelstudio": _LS_KEYS, "sync.dataset": _DATASET_KEYS, "sync.models": _MODELS_KEYS,
          "sync.models.registry": _REGISTRY_KEYS}


def _table(text: str, name: str) -> str:
    """The body of ``[name]`` (or ``# [name]``) up to the next table header."""
    match = re.search(rf"^(# )?\[{re.escape(name)}\]\n(.*?)(?=^(# )?\[|\Z)", text, re.M | re.S)
    assert match, f"[{name}] is not in {EXAMPLE.name}"
    return match.group(2)


def test_example_documents_every_sync_key_and_builds(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for table, keys in TABLES.items():
        body = _table(text, table)
        for key in keys:
            if key in TABLES.get(f"{table}.{key}", {}) or f"{table}.{key}" in TABLES:
                continue  # a subtable, documented as its own table
            assert re.search(rf"^(# )?{key} =", body, re.M), f"{table}.{key} is not documented"
    config = tmp_path / "annotator.toml"
    shutil.copy(EXAMPLE, config)
    cfg = load_sync_config(config, env={})
    assert cfg.store_root == tmp_path / "annotator-data" and cfg.daemon_address == "127.0.0.1:50051"
    agent = build_agent(cfg, env={})
    assert [t.name for t in agent.tasks] == ["upload"]  # kind = "none", no registry
    agent.close()
    config.write_text(text.replace('kind = "none"', 'kind = "groundtruth"'))
    agent = build_agent(load_sync_config(config, env={}), env={})
    assert [t.name for t in agent.tasks] == ["upload", "review-submit", "merge"]
    agent.close()


def test_the_daemons_tables_are_read_the_daemons_way(tmp_path: Path) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text('[server]\nlisten = "0.0.0.0:6000"\ntoken = "s3cret-token"\n[store]\nroot = "data"\n'
                      '[sync]\nmetrics_listen = "127.0.0.1:0"\n')
    cfg = load_sync_config(config, env={"ANNOTATOR_STORE__ROOT": str(tmp_path / "elsewhere")})
    assert cfg.store_root == tmp_path / "elsewhere"  # environment over file, as for `annotator serve`
    assert cfg.daemon_address == "127.0.0.1:6000" and cfg.metrics_listen == ("127.0.0.1", 0)
    assert "s3cret" not in repr(cfg)
    config.write_text("[store]\nroot = 5\n")
    with pytest.raises(SyncConfigError, match="store.root: expected a path"):
        load_sync_config(config, env={})


@pytest.mark.parametrize("review, words", [
    ({"kind": "mturk"}, "sync.review.kind: expected one of"),
    ({"kind": "labelstudio", "labelstudio": {"url": "http://127.0.0.1:1"}}, "sync.review.labelstudio.token"),
    ({"kind": "labelstudio", "labelstudio": {"url": "127.0.0.1:1", "token": "abcdefg"}}, "labelstudio.url"),
    ({"kind": "labelstudio", "labelstudio": {"url": "http://h:1", "token": "abcdefg", "document_root": "/nowhere"}},
     "must lie under"),
    ({"kind": "groundtruth", "groundtruth": {"job": {"role_arn": "arn"}}}, "job.workteam_arn: required"),
    ({"kind": "none", "groundtruth": {"outputprefix": "x"}}, "sync.review.groundtruth.outputprefix: unknown"),
])
def test_review_settings_errors_name_the_key(tmp_path: Path, review: dict, words: str) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text("")
    cfg = load_sync_config(config, env={})
    cfg = type(cfg)(**{**cfg.__dict__, "tables": {"review": review}})
    with pytest.raises(SyncConfigError, match=words):
        review_settings_from(cfg, env={})


def test_label_studio_token_from_the_environment_wins_and_is_not_shown(tmp_path: Path) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text('[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\n'
                      'url = "http://127.0.0.1:1"\ntoken = "from-the-file"\n')
    settings = review_settings_from(load_sync_config(config, env={}), env={TOKEN_ENV: "from-the-env"})
    assert settings.labelstudio is not None and settings.labelstudio.token == "from-the-env"
    assert "from-the" not in repr(settings)


def test_each_finished_batch_is_submitted_once_and_recorded(tmp_path: Path) -> None:
    from sync.objectstore import LocalFolderStore

    store, review, _ = fill_store(tmp_path / "store", review=5)
    target = LocalFolderStore(tmp_path / "outbox")
    metrics = MetricsRecorder()
    uploader = Uploader(store, target, UploadSettings("box-1", batch_size=3), metrics=metrics)
    backend = InMemoryReviewBackend()
    submit = ReviewSubmitTask(uploader.journal, store, target, backend)
    calls: list[str] = []
    original = backend.submit
    backend.submit = lambda batch_id, items: (calls.append(batch_id), original(batch_id, items))[1]  # type: ignore[method-assign]
    while uploader.run_once() | submit.run_once():
        pass
    assert sorted(backend.items) == sorted(review) and len(calls) == 2  # two batches, each once
    assert not submit.run_once()
    item = backend.items[review[0]]
    assert item.image_uri and item.image_uri.startswith("file://") and item.local_path == store.image_path(review[0])
    journal = Journal(tmp_path / "store" / "sync.sqlite3", clock=lambda: 0.0)
    assert [(b, n) for b, _, n in journal.submissions("memory")] == [(calls[0], 3), (calls[1], 2)]
    journal.close()
    sent = metrics.registry.get_sample_value("annotator_uploads_total", {"result": "ok"})
    assert sent == 12  # 5 images, 5 pre-annotations, 2 manifests
    uploader.close()
    store.close()


def test_every_runs_a_task_at_most_once_per_interval() -> None:
    now = [0.0]

    class Count:
        name, calls = "count", 0

        def run_once(self) -> bool:
            self.calls += 1
            return True

    task = Count()
    every = Every(task, 10.0, clock=lambda: now[0])
    assert every.run_once() and not every.run_once() and task.calls == 1
    now[0] = 10.0
    assert every.run_once() and task.calls == 2


def test_the_process_notifies_systemd_and_serves_metrics(tmp_path: Path) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from s3servers import free_port

    store, _, _ = fill_store(tmp_path / "store", review=2)
    store.close()
    port = free_port()
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "store"\n[sync]\nappliance_id = "box-1"\npoll_interval = 0.2\n'
                      f'metrics_listen = "127.0.0.1:{port}"\n')
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # AF_UNIX paths are short
        path = os.path.join(short, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.2)
        env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        env.pop("ANNOTATOR_CONFIG", None)
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "sync", "--config", str(config)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        messages: list[str] = []
        scraped = ""
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline and 'annotator_uploads_total{result="ok"} 5.0' not in scraped:
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    pass
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
                        scraped = resp.read().decode()
                except OSError:
                    pass
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        sock.close()
    assert proc.returncode == 0, err
    assert 'annotator_uploads_total{result="ok"} 5.0' in scraped  # 2 images, 2 pre-annotations, 1 manifest
    assert messages[0].startswith("READY=1") and messages[-1] == "STOPPING=1"
    assert any(m.startswith("STATUS=") for m in messages)


def test_model_pull_runs_only_with_a_registry_and_reloads_the_daemon_at_server_listen(tmp_path: Path) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:6001"\n[store]\nroot = "store"\n'
                      '[sync.models]\npoll_interval = 60\n[sync.models.registry]\nkind = "local"\nroot = "registry"\n')
    agent = build_agent(load_sync_config(config, env={}), env={})
    try:
        assert [t.name for t in agent.tasks] == ["upload", "models"]
        models = agent.tasks[-1]
        assert isinstance(models, Every) and models.interval == 60.0  # at most one pull a poll_interval
        puller = models.task.puller  # type: ignore[attr-defined]
        assert puller.reload_fn.__qualname__.startswith("grpc_reload_fn")
        assert not agent.tasks[-1].run_once()  # an empty registry: nothing to switch to
    finally:
        agent.close()


def test_a_labeling_job_output_path_the_agent_would_not_collect_is_refused(tmp_path: Path) -> None:
    """Ground Truth writes the output manifests to the job's output_s3_path; the agent lists
    output_prefix in the target bucket. If they differ, reviews would never come back."""
    config = tmp_path / "annotator.toml"
    job = ('[sync.review.groundtruth.job]\nrole_arn = "arn:aws:iam::1:role/gt"\n'
           'workteam_arn = "arn:aws:sagemaker:eu-west-1:1:workteam/private-crowd/x"\n'
           'ui_template_s3_uri = "s3://bkt/t.html"\n')
    base = ('[sync.target]\nkind = "s3"\nbucket = "bkt"\nprefix = "edge"\n'
            '[sync.review]\nkind = "groundtruth"\n[sync.review.groundtruth]\noutput_prefix = "gt-output"\n')
    config.write_text(base + job + 'output_s3_path = "s3://bkt/gt-output"\n')
    with pytest.raises(SyncConfigError, match=r"output_s3_path: .*\(s3://bkt/edge/gt-output,"):
        review_settings_from(load_sync_config(config, env={}), env={})
    config.write_text(base + job + 'output_s3_path = "s3://bkt/edge/gt-output/"\n')
    assert review_settings_from(load_sync_config(config, env={}), env={}).groundtruth is not None
    config.write_text(base + job)  # left out: the agent fills in its own
    assert review_settings_from(load_sync_config(config, env={}), env={}).groundtruth is not None


@pytest.mark.parametrize("env_root", ["env-store", None])
def test_the_agent_reads_the_store_the_daemon_writes(etc_and_work: tuple[Path, Path], env_root: str | None) -> None:
    """A relative ANNOTATOR_STORE__ROOT (or the default root) is the working directory's for
    both programs: the agent joined it to the config file's folder, read an empty store there
    and uploaded nothing, silently."""
    from service.config import load_config

    etc, work = etc_and_work
    config = etc / "annotator.toml"
    config.write_text("[sync]\nappliance_id = 'lab'\n", encoding="utf-8")
    env = {"ANNOTATOR_STORE__ROOT": env_root} if env_root else {}
    daemon = load_config(config, env=env).store.root
    agent = load_sync_config(config, env=env).store_root
    assert agent == daemon.absolute() == work / (env_root or "annotator-data")
    assert load_sync_config(config, env={}).target.root == work / "annotator-data" / "outbox"
    config.write_text("[store]\nroot = 'data'\n[sync]\nappliance_id = 'lab'\n", encoding="utf-8")
    assert load_sync_config(config, env={}).store_root == load_config(config, env={}).store.root == etc / "data"


def test_dataset_commands_find_the_agents_dataset_through_annotator_config(etc_and_work: tuple[Path, Path],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``annotator dataset``/``models`` without --config joined [sync.dataset] root to the working
    directory, not to the folder of $ANNOTATOR_CONFIG as the agent does."""
    import argparse

    from sync.dataset_cli import settings

    etc, _ = etc_and_work
    config = etc / "annotator.toml"
    config.write_text("[store]\nroot = 'data'\n[sync.dataset]\nroot = 'ds'\n", encoding="utf-8")
    monkeypatch.setenv("ANNOTATOR_CONFIG", str(config))
    args = argparse.Namespace(config=None, store_root=None, dataset_root=None)
    agent = load_sync_config(None)
    assert settings(args).dataset_root == etc / "ds" == agent.base / "ds"
    assert settings(args).store_root == agent.store_root == etc / "data"


def test_the_agent_hands_its_heartbeat_to_the_uploader_and_the_bundle_download(tmp_path: Path) -> None:
    """A bundle download over weak LTE outlasted the watchdog's 900 s: systemd killed the agent
    mid-download and the next start downloaded from scratch. Each file fetched now feeds it."""
    import json

    config = tmp_path / "annotator.toml"
    config.write_text('[store]\nroot = "store"\n[sync.models]\npoll_interval = 60\n'
                      '[sync.models.registry]\nkind = "local"\nroot = "registry"\n')
    agent = build_agent(load_sync_config(config, env={}), env={})
    try:
        uploader, models = agent.tasks
        assert uploader.progress == agent.beat  # type: ignore[attr-defined]
        registry = models.task.puller.registry  # type: ignore[attr-defined]
        assert registry.progress == agent.beat
        registry.store.put("bundles/b1/bundle.json", json.dumps(
            {"id": "b1", "created": "2030", "models": {"head": {"file": "head.onnx"}, "pose": {"file": "pose.onnx"}}}
        ).encode())
        for name in ("head.onnx", "pose.onnx"):
            registry.store.put(f"bundles/b1/{name}", b"weights")
        now = [1000.0]
        agent.clock = lambda: now[0]  # type: ignore[method-assign]
        agent.beat()
        health: list[bool] = []
        get = registry.store.get

        def slow_get(key: str, progress=None) -> bytes:  # 10 minutes a file
            now[0] += 600
            health.append(agent.healthy())
            return get(key, progress)

        registry.store.get = slow_get
        registry.download("b1", tmp_path / "staging" / "b1")
        assert len(health) >= 3 and all(health)
        registry.progress = None  # without the hook the same download is a stall
        health.clear()
        registry.download("b1", tmp_path / "staging" / "b1")
        assert not all(health)
    finally:
        agent.close()


def test_an_answer_that_is_not_json_never_refuses_a_batch(tmp_path: Path) -> None:
    """A proxy's HTML page (200) made ``json.loads`` raise ValueError, which the submit task
    took for the backend refusing the batch: a PermanentError that stopped the agent."""
    import json

    from sync.errors import RetryableError
    from sync.objectstore import LocalFolderStore

    store, review, _ = fill_store(tmp_path / "store", review=2)
    target = LocalFolderStore(tmp_path / "outbox")
    uploader = Uploader(store, target, UploadSettings("box-1"))
    backend = InMemoryReviewBackend()
    submit = ReviewSubmitTask(uploader.journal, store, target, backend)
    while uploader.run_once():
        pass

    def html(batch_id: str, items: object) -> None:
        json.loads("<html><body>502 Bad Gateway</body></html>")

    backend.submit = html  # type: ignore[method-assign,assignment]
    with pytest.raises(RetryableError, match="not JSON"):
        submit.run_once()
    assert uploader.journal.unsubmitted_batches("memory")  # left for the next pass
    uploader.close()
    store.close()
