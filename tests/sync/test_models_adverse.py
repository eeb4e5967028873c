"""Model pull when things go wrong around it: two pulls at once on one models root, kill -9
between the pointer moves of a switch, kill -9 while a candidate is checked, a bundle id
published again with other contents.

Real bundles (coco17), a folder registry, the daemon's engine swapped by the reload callable
(``box`` from ``test_models_faults``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from service.bundle import load_bundle, write_bundle
from service.errors import BundleError
from sync.errors import PermanentError, RetryableError, SyncError
from sync.objectstore import LocalFolderStore
from sync.publish import publish_bundle
from test_models import publish
from test_models_faults import Killed, box  # noqa: F401  (the fixture is used by name)

pytestmark = pytest.mark.slow


# -- two pulls at once (bug: the second one's download pulled the first one's staged copy away,
#    and the first refused for good the bundle the second had just switched to) --

def test_a_second_pull_on_the_same_models_root_waits_its_turn(box: dict[str, Any]) -> None:
    """The agent's pass and an operator's ``annotator models pull --once`` at the same moment."""
    slots, daemon = box["slots"], box["daemon"]
    publish(box["registry"], box["base"], "b-next", "2030-01-01T00:00:00Z", None)
    first = box["restart"]()
    second = box["restart"]()
    download = first.registry.download
    seen: list[BaseException | None] = []

    def download_then_other_pass(bid: str, dest: Path) -> Path:
        staged = download(bid, dest)
        try:
            second.pull_once()  # runs while the first pass has its copy in staging/
            seen.append(None)
        except RetryableError as exc:
            seen.append(exc)
        return staged

    first.registry = type(first.registry)(first.registry.store)
    first.registry.download = download_then_other_pass  # type: ignore[method-assign]
    result = first.pull_once()
    assert result.refused == {} and slots.refused() == {}
    assert result.switched_to == "b-next" and daemon.bundle_id == "b-next"
    assert slots.current_path().name == "b-next"
    assert seen and isinstance(seen[0], RetryableError) and "another" in str(seen[0])


# -- kill -9 between the two pointer moves (bug: ``previous`` was left naming the bundle in
#    use, and ``models rollback`` then "rolled back" to it and refused the bundle in use) --

def _kill_after_pointing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """kill -9 right after the pointer ``name`` moved."""
    import sync.models as models

    real = models._point

    def point(link: Path, target: Path | None) -> None:
        real(link, target)
        if link.name == name:
            raise Killed

    monkeypatch.setattr(models, "_point", point)


@pytest.mark.parametrize("killed_in", ["switch", "rollback"])
def test_a_kill_between_the_pointer_moves_never_makes_the_bundle_in_use_previous(
        box: dict[str, Any], monkeypatch: pytest.MonkeyPatch, killed_in: str) -> None:
    slots, daemon, base = box["slots"], box["daemon"], box["base"]
    folder = publish(box["registry"], base, "b-next", "2030-01-01T00:00:00Z", None)
    if killed_in == "switch":
        _kill_after_pointing(monkeypatch, "previous")  # previous moved, current not yet
        with pytest.raises(Killed):
            box["puller"].pull_once()
        for p in sorted(folder.rglob("*"), reverse=True):  # withdrawn before the agent restarts
            p.rmdir() if p.is_dir() else p.unlink()
    else:
        assert box["puller"].pull_once().switched_to == "b-next"
        _kill_after_pointing(monkeypatch, "current")  # current moved back, previous not yet cleared
        with pytest.raises(Killed):
            box["puller"].rollback()
    monkeypatch.undo()
    in_use = base.id  # the switch never completed, or the rollback did
    restarted = box["restart"]()
    restarted.pull_once()
    assert slots.current_path().name == in_use and daemon.bundle_id == in_use
    assert slots.previous_path() != slots.current_path()
    with pytest.raises(SyncError, match="no previous bundle"):  # rollback twice, or with nothing before
        restarted.rollback()
    assert in_use not in slots.refused() and slots.current_path().name == in_use
    assert daemon.bundle_id == in_use


# -- kill -9 while a candidate is checked (bug: staging/<id> and the gate's work folder stayed
#    for good once a newer bundle was taken instead) --

def test_a_pass_clears_a_candidate_left_in_staging_by_a_kill(box: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    slots, base = box["slots"], box["base"]
    publish(box["registry"], base, "b-1", "2030-01-01T00:00:00Z", None)
    gate = box["gate"]

    def killed(current: Any, candidate: Any) -> Any:
        (gate.work / "gate-killed").mkdir(parents=True)  # its evaluation folder, half filled
        raise Killed

    monkeypatch.setattr(gate, "check", killed)
    with pytest.raises(Killed):
        box["puller"].pull_once()
    monkeypatch.undo()
    assert (slots.root / "staging" / "b-1").is_dir()
    publish(box["registry"], base, "b-2", "2030-02-01T00:00:00Z", None)  # newer; b-1 is never a candidate again
    assert box["restart"]().pull_once().switched_to == "b-2"
    assert sorted(p.name for p in (slots.root / "staging").iterdir()) == []
    assert not any(gate.work.glob("gate-*"))


# -- a bundle id published again with other contents (bug: the installed copy, maybe the one in
#    use, was replaced, and removed for good when the daemon refused the new one) --

@pytest.mark.parametrize("daemon_refuses", [False, True])
def test_a_reused_bundle_id_with_other_contents_is_refused(box: dict[str, Any], daemon_refuses: bool) -> None:
    slots, daemon, base = box["slots"], box["daemon"], box["base"]
    folder = publish(box["registry"], base, base.id, "2030-01-01T00:00:00Z", None)  # the id in use, newer
    other = dataclasses.replace(base.thresholds, det_conf=0.9)
    write_bundle(dataclasses.replace(load_bundle(folder), thresholds=other))
    if daemon_refuses:
        def refuse(path: str) -> None:
            raise BundleError(f"{path}: fails on a blank image")
        daemon.fault = refuse
    loads = list(daemon.loads)
    result = box["puller"].pull_once()
    assert result.switched_to is None and "other contents" in result.refused[base.id]
    assert daemon.loads == loads and daemon.bundle_id == base.id
    current = load_bundle(slots.root / "current", verify=True)
    assert current.id == base.id and current.created == base.created and slots.installed() == [base.id]


def test_publishing_an_id_again_with_other_contents_is_refused(tmp_path: Path, box: dict[str, Any]) -> None:
    """A registry reader between the model files and bundle.json would see the old manifest with
    the new files (a checksum failure: refused for good), and an id must name one bundle."""
    base = box["base"]
    store = LocalFolderStore(tmp_path / "reg")
    publish_bundle(base.path, store)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "reg").rglob("*") if p.is_file()}
    publish_bundle(base.path, store)  # the same bundle again: fine
    edited = publish(tmp_path / "edited", base, base.id, base.created, None)
    other = dataclasses.replace(base.thresholds, det_conf=0.9)
    write_bundle(dataclasses.replace(load_bundle(edited), thresholds=other))
    with pytest.raises(PermanentError, match="other contents"):
        publish_bundle(edited, store)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "reg").rglob("*") if p.is_file()} == before


# -- adopt with a public key set (bug: ``models adopt`` installed an unsigned folder as the
#    bundle in use on a box whose pulls must be signed) --

def test_adopt_checks_the_signature_when_a_public_key_is_set(tmp_path: Path, pose_bundle: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import shutil

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sync.models import ModelPuller, ModelSlots
    from sync.models_cli import register
    from sync.registry import MANIFEST, SIGNATURE, BundleRegistry
    from sync.signing import public_key_pem, sign_manifest

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "registry.pub").write_bytes(public_key_pem(key))
    bundle = tmp_path / "bundle"
    shutil.copytree(pose_bundle.path, bundle)
    slots = ModelSlots(tmp_path / "models")
    puller = ModelPuller(slots, BundleRegistry(LocalFolderStore(tmp_path / "registry")), None, lambda p: None,
                         public_key=tmp_path / "registry.pub")
    with pytest.raises(BundleError, match="signature.*--unsigned"):
        puller.adopt(bundle)
    assert slots.current_path() is None  # nothing installed
    (bundle / SIGNATURE).write_bytes(sign_manifest((bundle / MANIFEST).read_bytes(), other))
    with pytest.raises(BundleError, match="signature"):
        puller.adopt(bundle)  # signed by another key
    assert slots.current_path() is None

    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n[sync.models]\nroot = "{tmp_path / "models"}"\n'
                      f'public_key = "{tmp_path / "registry.pub"}"\n')

    def adopt(*extra: str) -> int:
        args = parser.parse_args(["models", "adopt", str(bundle), "--config", str(config), *extra])
        return args.func(args)

    with pytest.raises(BundleError, match="--unsigned"):
        adopt()  # the key from the config
    assert adopt("--unsigned") == 0 and slots.current_path().name == pose_bundle.id
    assert "installed as current" in capsys.readouterr().out

    (bundle / SIGNATURE).write_bytes(sign_manifest((bundle / MANIFEST).read_bytes(), key))
    assert puller.adopt(bundle) == pose_bundle.id  # signed by the key: installed without --unsigned


# -- a bundle stamped ahead of the clock (bug: every later bundle sorted as older, never pulled,
#    and nothing said why) --

def test_a_bundle_in_use_stamped_ahead_of_the_clock_is_said(box: dict[str, Any],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import logging

    publish(box["registry"], box["base"], "b-future", "2999-01-01T00:00:00Z", None)  # a trainer's clock ahead
    puller = box["restart"]()
    assert puller.pull_once().switched_to == "b-future"
    publish(box["registry"], box["base"], "b-today", "2026-12-31T00:00:00Z", None)
    with caplog.at_level(logging.WARNING, logger="sync.models"):
        assert puller.pull_once().switched_to is None and puller.pull_once().switched_to is None
    said = [r.getMessage() for r in caplog.records if "ahead of this box's clock" in r.getMessage()]
    assert len(said) == 1 and "b-future" in said[0] and "models adopt" in said[0]
