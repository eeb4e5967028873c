"""Model pull faults that must not refuse a good bundle, end the agent or leave ``current`` and
the daemon out of step: store errors during a download, a validation gate that cannot score,
kill -9 between the pointer switch and the end of the daemon's reload, a power loss after a
switch (files never fsynced), kill -9 while the bundle in use is adopted again, leftovers of
killed downloads.

Real bundles (coco17), a folder registry; the daemon is either the real one behind gRPC
(``appliance`` from ``test_models``) or a real ``Engine`` swapped by the reload callable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from botocore.exceptions import ClientError

from service.bundle import Bundle, load_bundle, write_bundle
from service.errors import BundleError
from sync.dataset import Dataset
from sync.errors import PermanentError, RetryableError
from sync.gate import GateConfig, ValidationGate
from sync.models import ModelPuller, ModelSlots
from sync.objectstore import LocalFolderStore
from sync.registry import BundleRegistry
from sync.s3store import wrap_boto_error
from test_models import appliance, publish  # noqa: F401  (the fixture is used by name)
from procs import trace_disk

pytestmark = pytest.mark.slow

SWITCHING = "switching.json"  # the marker of a switch in flight, under the models root (sync.models)


class Killed(BaseException):
    """Stands for kill -9: nothing after the point where it is raised runs, no handler sees it."""


class Daemon:
    """The daemon's engine as the reload callable sees it: a real ``Engine`` per load."""

    def __init__(self, bundle: Bundle) -> None:
        from service.engine import Engine

        self.engine = Engine(bundle)
        self.loads: list[str] = []
        self.fault: Callable[[str], None] | None = None

    def reload(self, path: str) -> None:
        from service.engine import Engine

        self.loads.append(Path(path).name)
        if self.fault is not None:
            self.fault(path)
        self.engine = Engine(load_bundle(path))

    @property
    def bundle_id(self) -> str:
        return self.engine.bundle.id


@pytest.fixture
def box(tmp_path: Path, pose_bundle: Bundle) -> dict[str, Any]:
    """The adopted coco17 bundle in use, no hold-out images (checksums-only gate), an empty registry."""
    dataset = Dataset(tmp_path / "dataset")
    slots = ModelSlots(tmp_path / "models")
    daemon = Daemon(pose_bundle)
    gate = ValidationGate(dataset, lambda i: tmp_path / "none" / i, GateConfig(min_images=3), tmp_path / "work")
    registry = BundleRegistry(LocalFolderStore(tmp_path / "registry"))
    puller = ModelPuller(slots, registry, gate, daemon.reload)
    puller.adopt(pose_bundle.path)

    def restart(reload_fn: Callable[[str], Any] | None = None) -> ModelPuller:
        """A new agent process on the same folders."""
        return ModelPuller(ModelSlots(tmp_path / "models"), registry, gate, reload_fn or daemon.reload)

    yield {"slots": slots, "puller": puller, "daemon": daemon, "registry": tmp_path / "registry",
           "base": pose_bundle, "restart": restart, "gate": gate}
    dataset.close()


# -- store errors during the download (bug: any PermanentError refused the bundle for good) --

class ExpiringStore(LocalFolderStore):
    """A folder registry whose credentials expire for the model files (S3's error, wrapped as
    ``S3Store`` wraps it), or whose bucket is gone."""

    error: str | None = "ExpiredToken"

    def get(self, key: str, progress=None) -> bytes:
        if self.error and key.endswith(".onnx"):
            exc = ClientError({"Error": {"Code": self.error, "Message": self.error},
                               "ResponseMetadata": {"HTTPStatusCode": 400 if self.error == "ExpiredToken" else 404}},
                              "GetObject")
            raise wrap_boto_error(exc, "edge-registry", f"get {key}") from exc
        return super().get(key, progress)


@pytest.mark.parametrize("error, message", [("ExpiredToken", "credentials rejected"),
                                            ("NoSuchBucket", "does not exist")])
def test_credential_and_bucket_errors_refuse_nothing(box: dict[str, Any], error: str, message: str) -> None:
    slots, base = box["slots"], box["base"]
    publish(box["registry"], base, "b-good", "2030-01-01T00:00:00Z", None)
    store = ExpiringStore(box["registry"])
    store.error = error
    puller = ModelPuller(slots, BundleRegistry(store), box["gate"], box["daemon"].reload)
    for _ in range(2):
        with pytest.raises(PermanentError, match=message):  # the agent stops and says what to fix
            puller.pull_once()
    assert slots.refused() == {} and slots.current_path().name == base.id
    assert not any(p.name == "b-good" for p in (slots.root / "staging").iterdir())

    store.error = None  # keys renewed: the same bundle is taken
    assert puller.pull_once().switched_to == "b-good" and box["daemon"].bundle_id == "b-good"


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "bundle.json").read_text())


BROKEN: dict[str, tuple[Callable[[dict[str, Any], Path], None], str]] = {
    "missing-file": (lambda m, f: (f / m["models"]["pose_main"]["file"]).unlink(), "missing from the registry"),
    "models-not-a-table": (lambda m, f: m.update(models=["pose_main.onnx"]), "bundle.json is malformed"),
    "backslash-name": (lambda m, f: m["models"]["pose_main"].update(file="..\\pose.onnx"),
                       "is not a plain file name"),
    # load_bundle itself would raise ValueError on this one, past every except clause
    "lineage-not-a-table": (lambda m, f: m.update(lineage="trained on a Tuesday"), "lineage is a str"),
    "metrics-not-a-table": (lambda m, f: m.update(metrics="good"), "verification"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_bundle_content_problems_are_refused(box: dict[str, Any], kind: str) -> None:
    slots, base = box["slots"], box["base"]
    folder = publish(box["registry"], base, f"b-{kind}", "2030-01-01T00:00:00Z", None)
    manifest = _manifest(folder)
    change, message = BROKEN[kind]
    change(manifest, folder)
    (folder / "bundle.json").write_text(json.dumps(manifest))
    result = box["puller"].pull_once()
    assert result.switched_to is None and message in result.refused[f"b-{kind}"]
    assert set(slots.refused()) == {f"b-{kind}"} and slots.current_path().name == base.id
    assert box["daemon"].loads == []


@pytest.mark.parametrize("when", ["listing", "download"])
def test_a_bundle_withdrawn_during_the_pull_is_not_refused(box: dict[str, Any], when: str) -> None:
    folder = publish(box["registry"], box["base"], "b-gone", "2030-01-01T00:00:00Z", None)

    class Withdrawing(LocalFolderStore):
        def get(self, key: str, progress=None) -> bytes:
            if key.endswith(".onnx" if when == "download" else "bundle.json"):
                shutil.rmtree(folder, ignore_errors=True)  # the publisher deletes it now
            return super().get(key, progress)

    puller = ModelPuller(box["slots"], BundleRegistry(Withdrawing(box["registry"])), box["gate"], box["daemon"].reload)
    if when == "download":
        with pytest.raises(RetryableError, match="withdrawn"):
            puller.pull_once()
    assert puller.pull_once().newer == []
    assert box["slots"].refused() == {} and box["slots"].current_path().name == box["base"].id


# -- the validation gate cannot score (bug: the exception ended the agent, every pass) --

def _score_failing_for(monkeypatch: pytest.MonkeyPatch, bundle_id: str, exc: Exception) -> None:
    import sync.gate

    real = sync.gate.score_bundle

    def score(bundle: Bundle, data: dict[str, Any], images: Path) -> dict[str, float]:
        if bundle.id == bundle_id:
            raise exc
        return real(bundle, data, images)

    monkeypatch.setattr(sync.gate, "score_bundle", score)


def test_a_candidate_the_gate_cannot_score_is_refused(appliance: dict[str, Any],  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    slots, puller, client, base = appliance["slots"], appliance["puller"], appliance["client"], appliance["base"]
    publish(appliance["registry"], base, "b-unrunnable", "2030-01-01T00:00:00Z", appliance["key"])
    _score_failing_for(monkeypatch, "b-unrunnable", RuntimeError(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Concat node"))
    result = puller.pull_once()
    reason = result.refused["b-unrunnable"]
    assert result.switched_to is None and "validation gate" in reason and "cannot be scored" in reason
    assert "RUNTIME_EXCEPTION" in reason and "RuntimeError" in reason
    assert slots.current_path().name == base.id and client.status().bundle_id == base.id
    assert "b-unrunnable" in slots.refused()


def test_a_gate_that_cannot_score_the_bundle_in_use_refuses_nothing(appliance: dict[str, Any],  # noqa: F811
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    slots, puller, client, base = appliance["slots"], appliance["puller"], appliance["client"], appliance["base"]
    publish(appliance["registry"], base, "b-fine", "2030-01-01T00:00:00Z", appliance["key"])
    _score_failing_for(monkeypatch, base.id, ValueError("keypoint_mapping: the hold-out names no key point"))
    for _ in range(2):
        with pytest.raises(RetryableError, match=f"bundle in use {base.id} cannot be scored"):
            puller.pull_once()
    assert slots.refused() == {} and slots.current_path().name == base.id
    monkeypatch.undo()
    assert puller.pull_once().switched_to == "b-fine" and client.status().bundle_id == "b-fine"


def test_a_candidate_out_of_disk_while_scored_is_not_refused(appliance: dict[str, Any],  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    publish(appliance["registry"], appliance["base"], "b-later", "2030-01-01T00:00:00Z", appliance["key"])
    _score_failing_for(monkeypatch, "b-later", OSError(28, "No space left on device"))
    with pytest.raises(RetryableError, match="No space left"):
        appliance["puller"].pull_once()
    assert appliance["slots"].refused() == {}


# -- kill -9 between the pointer switch and the end of the reload --

def _die(path: str) -> None:
    raise Killed


def test_a_switch_killed_during_the_reload_is_completed_after_the_restart(appliance: dict[str, Any]) -> None:  # noqa: F811
    """The real daemon behind gRPC: the process dies while the daemon is being asked to reload."""
    slots, puller, client, base = appliance["slots"], appliance["puller"], appliance["client"], appliance["base"]
    publish(appliance["registry"], base, "b-next", "2030-01-01T00:00:00Z", appliance["key"])
    grpc_reload = puller.reload_fn
    puller.reload_fn = _die
    with pytest.raises(Killed):
        puller.pull_once()
    assert slots.current_path().name == "b-next" and client.status().bundle_id == base.id  # out of step

    restarted = ModelPuller(ModelSlots(slots.root), puller.registry, puller.gate, grpc_reload,
                            public_key=appliance["registry"].parent / "registry.pub")
    result = restarted.pull_once()
    assert result.switched_to == "b-next" and result.refused == {}
    assert client.status().bundle_id == "b-next" and slots.current_path().name == "b-next"
    assert slots.previous_path().name == base.id and not (slots.root / SWITCHING).exists()
    assert restarted.pull_once().switched_to is None


def _killed_switching_to_next(box: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Publish b-next and die while the daemon is asked to load it; returns (slots, daemon, base)."""
    slots, daemon, base = box["slots"], box["daemon"], box["base"]
    publish(box["registry"], base, "b-next", "2030-01-01T00:00:00Z", None)
    daemon.fault = _die
    with pytest.raises(Killed):
        box["puller"].pull_once()
    return slots, daemon, base


def test_an_interrupted_switch_to_a_bundle_the_daemon_refuses_goes_back(box: dict[str, Any]) -> None:
    slots, daemon, base = _killed_switching_to_next(box)
    assert slots.current_path().name == "b-next" and daemon.bundle_id == base.id

    def refuse_next(path: str) -> None:
        if Path(path).name == "b-next":
            raise BundleError(f"{path}: fails on a blank image")

    daemon.fault = refuse_next
    result = box["restart"]().pull_once()
    assert "daemon refused" in result.refused["b-next"] and result.switched_to is None
    assert slots.current_path().name == base.id and daemon.bundle_id == base.id
    assert daemon.loads[-2:] == ["b-next", base.id]  # asked again, then back to the old one
    assert "b-next" in slots.refused() and "b-next" not in slots.installed()
    assert not (slots.root / SWITCHING).exists()


def test_an_interrupted_switch_waits_for_an_unreachable_daemon(box: dict[str, Any]) -> None:
    slots, daemon, base = _killed_switching_to_next(box)

    def unreachable(path: str) -> None:
        raise RetryableError("daemon at 127.0.0.1:50051: ReloadModels failed with UNAVAILABLE")

    daemon.fault = unreachable
    restarted = box["restart"]()
    with pytest.raises(RetryableError, match="interrupted switch"):
        restarted.pull_once()
    assert (slots.root / SWITCHING).exists() and slots.refused() == {}
    daemon.fault = None
    assert restarted.pull_once().switched_to == "b-next" and daemon.bundle_id == "b-next"
    assert not (slots.root / SWITCHING).exists()


def test_a_rollback_killed_during_the_reload_is_completed_by_the_next_pull(box: dict[str, Any]) -> None:
    slots, daemon, base = box["slots"], box["daemon"], box["base"]
    publish(box["registry"], base, "b-next", "2030-01-01T00:00:00Z", None)
    assert box["puller"].pull_once().switched_to == "b-next" and daemon.bundle_id == "b-next"
    daemon.fault = _die
    with pytest.raises(Killed):
        box["puller"].rollback()
    daemon.fault = None
    result = box["restart"]().pull_once()
    assert daemon.bundle_id == base.id and slots.current_path().name == base.id
    assert "rolled back" in slots.refused()["b-next"] and result.newer == []  # not pulled again
    assert not (slots.root / SWITCHING).exists()


# -- power loss after a switch (bug: no file of a pulled or adopted bundle was ever fsynced) --

@pytest.mark.parametrize("how", ["pull", "adopt"])
def test_every_file_of_a_bundle_is_on_disk_before_current_names_it(box: dict[str, Any], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """ext4 keeps a rename through a power loss but brings never-synced new files back empty:
    ``current`` must not be re-pointed before every file and folder of the bundle is synced,
    nor the bundle's name in ``bundles/`` be left unsynced."""
    base = box["base"]
    if how == "pull":
        slots, bid = box["slots"], "b-next"
        publish(box["registry"], base, bid, "2030-01-01T00:00:00Z", None)
        events = trace_disk(monkeypatch)
        assert box["puller"].pull_once().switched_to == bid
    else:
        slots, bid = ModelSlots(tmp_path / "fresh-models"), base.id
        events = trace_disk(monkeypatch)
        ModelPuller(slots, box["puller"].registry, None, lambda p: None).adopt(base.path)
    bundle = slots.root / "bundles" / bid
    assert slots.current_path() == bundle
    moved = events.index(("replace", slots.root / "current"))
    installed = events.index(("replace", bundle))
    synced = {ino for kind, ino in events[:moved] if kind == "fsync"}
    parts = [bundle, *bundle.rglob("*")]
    assert {p.name for p in parts} >= {"bundle.json", "pose_main.onnx"}
    assert [p.relative_to(slots.root).as_posix() for p in parts if p.stat().st_ino not in synced] == []
    assert ("fsync", (slots.root / "bundles").stat().st_ino) in events[installed:moved]
    assert ("fsync", slots.root.stat().st_ino) in events[moved:]  # the pointer itself


# -- adopt run twice (bug: the bundle in use was removed before its copy took its place) --

def _kill_when_touched(monkeypatch: pytest.MonkeyPatch, dest: Path) -> None:
    """kill -9 right after ``dest`` is removed or renamed away."""
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def rmtree(path: Any, *args: Any, **kw: Any) -> None:
        real_rmtree(path, *args, **kw)
        if Path(path) == dest:
            raise Killed

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        real_replace(src, dst, **kw)
        if Path(src) == dest:
            raise Killed

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "replace", replace)


def test_adopting_the_bundle_in_use_again_keeps_it_in_place(box: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A provisioning script that runs ``models adopt`` twice: the bundle ``current`` names is
    never removed, so a kill -9 at any point leaves a daemon that can start."""
    slots, base = box["slots"], box["base"]
    dest = slots.root / "bundles" / base.id
    inode = dest.stat().st_ino
    _kill_when_touched(monkeypatch, dest)
    assert box["puller"].adopt(base.path) == base.id
    monkeypatch.undo()
    assert dest.stat().st_ino == inode  # the same folder, not a copy
    assert load_bundle(slots.root / "current").id == base.id and slots.installed() == [base.id]
    assert not any((slots.root / "staging").iterdir())


def test_a_reinstall_under_the_same_id_killed_midway_is_put_back(box: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another bundle under the id in use (edited without a new id): killed between moving the
    old copy away and moving the new one in, the next pass puts the old one back."""
    slots, base = box["slots"], box["base"]
    edited = tmp_path / "edited"
    shutil.copytree(base.path, edited)
    write_bundle(dataclasses.replace(base, path=edited, created="2031-01-01T00:00:00Z"))
    _kill_when_touched(monkeypatch, slots.root / "bundles" / base.id)
    with pytest.raises(Killed):
        box["puller"].adopt(edited)
    monkeypatch.undo()
    box["restart"]().pull_once()
    assert load_bundle(slots.root / "current").created == base.created and slots.installed() == [base.id]
    assert box["puller"].adopt(edited) == base.id  # not killed: the edited copy replaces it
    assert load_bundle(slots.root / "current").created == "2031-01-01T00:00:00Z"
    assert sorted(p.name for p in (slots.root / "bundles").iterdir()) == [base.id]


# -- leftovers of killed downloads (bug: staging/.<id>.partial stayed for good) --

def test_a_pass_clears_what_killed_downloads_left(box: dict[str, Any]) -> None:
    slots, base = box["slots"], box["base"]
    staging = slots.root / "staging"
    shutil.copytree(base.path, staging / ".b-withdrawn.partial")  # kill -9 mid-download
    (staging / ".b-half.partial").mkdir()
    (staging / ".partial").mkdir()  # not a name the download makes
    (staging / ".notes.partial").write_text("a file, not a download")
    box["restart"]().pull_once()
    assert sorted(p.name for p in staging.iterdir()) == [".notes.partial", ".partial"]
    assert slots.current_path().name == base.id and slots.installed() == [base.id]
