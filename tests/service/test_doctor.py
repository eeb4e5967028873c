"""``annotator doctor``: a good configuration passes, broken ones FAIL with one line of advice;
S3 and Label Studio probes against real servers on loopback."""
from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from service.doctor import FAIL, OK, SKIP, WARN, check_clock, check_review, check_s3, exit_code, run_checks
from service.ops_cli import register


def write_config(tmp_path: Path, bundle: Path, **sections: dict[str, Any]) -> Path:
    """A TOML file with every folder under tmp_path (created), plus extra tables."""
    for name in ("drop", "store", "sidecars"):
        (tmp_path / name).mkdir(exist_ok=True)
    tables: dict[str, dict[str, Any]] = {
        "server": {"listen": "127.0.0.1:0"},
        "store": {"root": str(tmp_path / "store"), "min_free_mb": 1},
        "drop": {"folder": str(tmp_path / "drop")},
        "engine": {"bundle": str(bundle)},
        "outputs": {"sidecar_dir": str(tmp_path / "sidecars")},
        **sections,
    }
    lines = []
    for name, body in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    path = tmp_path / "annotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def by_name(checks: list[Any]) -> dict[str, Any]:
    return {c.name: c for c in checks}


def test_good_config_passes(tmp_path: Path, pose_bundle: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    path = write_config(tmp_path, pose_bundle.path)
    checks = run_checks(path, env={})
    assert [c.name for c in checks] == ["config", "folder drop.folder", "folder store.root",
                                        "folder outputs.sidecar_dir", "disk", "inotify watches", "bundle",
                                        "providers", "s3",
                                        "review", "clock"]
    assert {c.name: c.level for c in checks if c.level != OK} == {"s3": SKIP, "review": SKIP}
    assert pose_bundle.id in by_name(checks)["bundle"].detail
    assert "onnxruntime" in by_name(checks)["providers"].detail
    assert exit_code(checks) == 0

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--config", str(path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out


def test_broken_config_fails_with_advice(tmp_path: Path, pose_bundle: Any) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(pose_bundle.path, bundle)
    model = next(bundle.glob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: the checksum no longer matches
    model.write_bytes(bytes(data))
    path = write_config(tmp_path, bundle)
    shutil.rmtree(tmp_path / "drop")

    checks = by_name(run_checks(path, env={}))
    # a first start (the folder above exists, the store never took a drop file): made, said
    assert checks["folder drop.folder"].level == WARN
    assert "does not exist" in checks["folder drop.folder"].detail
    assert checks["bundle"].level == FAIL and "checksum" in checks["bundle"].detail
    for name in ("folder drop.folder", "bundle"):
        assert checks[name].advice and "\n" not in checks[name].advice
    assert exit_code(list(checks.values())) == 1


@pytest.mark.parametrize("body, expect", [
    ("[store]\nroot = 3\n", "store.root: expected a path"),
    ("[engine]\nbatch_sise = 4\n", "did you mean 'engine.batch_size'"),
    ("not toml [", "cannot"),
])
def test_invalid_config_is_one_fail(tmp_path: Path, body: str, expect: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    checks = run_checks(path, env={})
    assert checks[0].name == "config" and checks[0].level == FAIL and expect in checks[0].detail
    assert exit_code(checks) == 1


def test_missing_bundle_and_store_to_be_created(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path / "no-bundle")
    shutil.rmtree(tmp_path / "store")
    checks = by_name(run_checks(path, env={}))
    assert checks["folder store.root"].level == WARN  # the daemon creates it
    assert checks["bundle"].level == FAIL and "no bundle.json" in checks["bundle"].detail


def test_sync_table_is_read_and_the_rest_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path / "b", sync={"appliance_id": "lab"})
    path.write_text(path.read_text() + '[sync.review]\nkind = "groundtruth"\n')
    checks = by_name(run_checks(path, env={}))
    config = checks["config"]
    assert config.level == OK, config  # [sync] is passed through to the sync agent
    assert checks["s3"].level == SKIP and checks["review"].level == SKIP


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    finally:
        server.stop()


def test_s3_probe(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    for name, value in (("AWS_ACCESS_KEY_ID", "AKIATEST"), ("AWS_SECRET_ACCESS_KEY", "secret"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket="edge-doctor")
    target = {"kind": "s3", "endpoint_url": moto_s3, "region": "us-east-1"}
    assert check_s3({"target": {**target, "bucket": "edge-doctor"}}).level == OK
    missing = check_s3({"target": {**target, "bucket": "no-such-bucket"}})
    assert missing.level == FAIL and "does not exist" in missing.detail
    free = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = free.server_port
    free.server_close()  # nothing listens there now
    down = check_s3({"target": {**target, "bucket": "edge-doctor", "endpoint_url": f"http://127.0.0.1:{port}"}},
                    timeout=1.0)
    assert down.level == FAIL and "unreachable" in down.detail and down.advice
    # a scheme-less endpoint: boto3's ValueError ended the whole report (exit 2, no table)
    bare = check_s3({"target": {**target, "bucket": "edge-doctor", "endpoint_url": f"127.0.0.1:{port}"}})
    assert bare.level == FAIL and "Invalid endpoint" in bare.detail and "http(s)://host:port" in bare.advice
    assert check_s3({}).level == SKIP


class _Health(http.server.BaseHTTPRequestHandler):
    status = b'{"status": "UP"}'

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        code = 200 if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(self.status if code == 200 else b"")

    def log_message(self, *args: Any) -> None:
        pass


def test_label_studio_probe() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert check_review({"review": {"kind": "labelstudio", "url": url + "/"}}).level == OK
        assert check_review({"review": {"kind": "labelstudio", "labelstudio": {"url": url}}}).level == OK
        wrong = check_review({"review": {"kind": "labelstudio", "url": url + "/sub"}})
        assert wrong.level == FAIL and wrong.advice
    finally:
        server.shutdown()
        server.server_close()
    assert check_review({"review": {"kind": "labelstudio", "url": url}}, timeout=1.0).level == FAIL
    assert check_review({}).level == SKIP and check_review({"review": {"kind": "none"}}).level == SKIP


def test_clock(tmp_path: Path) -> None:
    assert check_clock(tmp_path).level == OK
    stale = check_clock(tmp_path, now=lambda: 946684800.0)  # 2000-01-01
    assert stale.level == FAIL and "timedatectl" in stale.advice


def test_gpu_provider_offered_but_not_loading_is_a_warning(tmp_path: Path, pose_bundle: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu offers CUDA whenever its provider library ships; without the CUDA
    libraries a session falls back to the CPU. Doctor makes a session and says so. Simulated
    here by offering CUDA from the CPU build, whose sessions then run on the CPU."""
    import onnxruntime as ort

    offered = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    checks = by_name(run_checks(write_config(tmp_path, pose_bundle.path), env={}))
    c = checks["providers"]
    assert c.level == WARN, c
    assert "CUDAExecutionProvider is offered but a session of the bundle runs on CPUExecutionProvider" in c.detail
    assert "onnxruntime-gpu[cuda,cudnn]" in c.advice


@pytest.mark.parametrize("sync, extra, env, words", [
    ({"batchsize": 5}, "", {}, "sync.batchsize: unknown key"),
    ({"appliance_id": "lab"}, '[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\n'
     'url = "http://127.0.0.1:1"\n', {}, "sync.review.labelstudio.token: required"),
    ({"appliance_id": "lab"}, '[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\n'
     'url = "http://127.0.0.1:1"\n', {"ANNOTATOR_LABEL_STUDIO_TOKEN": "abc"},
     "sync.review.labelstudio.token: too short (3 characters, from ANNOTATOR_LABEL_STUDIO_TOKEN)"),
    ({"appliance_id": "lab"}, "[sync.dataset]\nholdout_fraction = 2\n", {}, "sync.dataset.holdout_fraction"),
    ({"appliance_id": "lab"}, '[sync.training]\nrole_arn = "arn:aws:iam::1:role/x"\nimage_uri = "i"\n'
     'input_s3 = "s3://b/in"\noutput_s3 = "s3://b/out"\n', {}, "needs [sync.models.registry]"),  # sync.agent's rule
], ids=["unknown-key", "no-label-studio-token", "short-label-studio-token", "dataset", "training-without-registry"])
def test_the_sync_tables_are_checked_by_the_agents_own_rules(tmp_path: Path, pose_bundle: Any, sync: dict,
                                                             extra: str, env: dict, words: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``annotator sync`` refuses these at start (exit 2; under systemd a restart loop): doctor
    must not say "all checks passed" for them."""
    import argparse

    path = write_config(tmp_path, pose_bundle.path, sync=sync)
    path.write_text(path.read_text() + extra)
    checks = run_checks(path, env=env)
    check = by_name(checks)["sync"]
    assert check.level == FAIL and words in check.detail, check
    assert check.advice and "\n" not in check.advice
    assert [c.name for c in checks][:2] == ["config", "sync"] and exit_code(checks) == 1
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--config", str(path)])
    assert args.func(args) == 1
    assert "all checks passed" not in capsys.readouterr().out


def test_a_valid_sync_table_passes_with_the_token_from_the_environment(tmp_path: Path, pose_bundle: Any) -> None:
    path = write_config(tmp_path, pose_bundle.path, sync={"appliance_id": "lab"})
    path.write_text(path.read_text() + '[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\n'
                    'url = "http://127.0.0.1:1"\n')
    check = by_name(run_checks(path, env={"ANNOTATOR_LABEL_STUDIO_TOKEN": "a-long-token"}))["sync"]
    assert check.level == OK and "labelstudio" in check.detail, check
    assert "a-long-token" not in check.detail
    assert "sync" not in by_name(run_checks(write_config(tmp_path, pose_bundle.path), env={}))  # no [sync]: no line


def test_disk_says_how_long_the_space_lasts_at_the_last_days_intake(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that took 3 images of 1 MB in the last day (and one long before, not counted):
    the disk check reads 3 images a day, 6 MB with processed/ copies on the same disk, and warns
    when that fills the space above the floor within a week."""
    import time
    from types import SimpleNamespace

    from service.config import RetentionConfig
    from service.doctor import check_disk
    from service.store import Store

    root = tmp_path / "store"
    now = time.time()
    store = Store(root, clock=lambda: now - 3 * 86400)
    store.ingest(b"\xff" * 1_000_000 + b"old", "test")
    store.clock = lambda: now - 60
    for n in range(3):
        store.ingest(b"\xff" * 1_000_000 + bytes([n]), "test")
    store.close()
    free = 10_000_000_000  # fixed: other processes write to this disk while the test runs
    monkeypatch.setattr("service.doctor.shutil.disk_usage", lambda p: SimpleNamespace(free=free))

    def cfg(floor_mb: int, retention: RetentionConfig = RetentionConfig()) -> Any:
        return SimpleNamespace(store=SimpleNamespace(root=root, min_free_mb=floor_mb), retention=retention,
                               drop=SimpleNamespace(folder=tmp_path / "drop", processed_mode="move"))

    roomy = check_disk(cfg(0))
    assert roomy.level == OK and "last 24 h: 3 images, 0.01 GB/day" in roomy.detail
    assert "retention: off, nothing is ever removed" in roomy.detail
    # A floor that leaves 5 days of 6 MB above it: a warning that names retention.
    tight = check_disk(cfg((free - 5 * 6_000_003) // 1_000_000))
    assert tight.level == WARN and "floor is reached in under 7 days" in tight.advice and "[retention]" in tight.advice
    kept = check_disk(cfg(0, RetentionConfig(auto_image_days=30)))
    assert "retention: auto-accepted images after 30 days" in kept.detail
    keep_mode = cfg(0)
    keep_mode.drop.processed_mode = "keep"  # the drop folder itself keeps the second copy
    assert "0.01 GB/day" in check_disk(keep_mode).detail
    keep_mode.drop.processed_mode = "delete"
    assert "0.00 GB/day" in check_disk(keep_mode).detail
