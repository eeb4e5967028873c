"""Folders of publications killed before their bundle.json: found, kept while young, removed
on request (``annotator models clean-registry``), against real processes and a moto bucket."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from s3servers import S3Server
from sync.objectstore import LocalFolderStore
from sync.publish import publish_bundle
from sync.registry import BundleRegistry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "service" / "assets" / "demo_bundle"


def killed_publication(registry: Path, bundle_dir: Path) -> None:
    """``publish_bundle`` in a process that gets SIGKILL as it is about to write bundle.json."""
    child = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from sync.objectstore import LocalFolderStore
        from sync.publish import publish_bundle
        store = LocalFolderStore({str(registry)!r})
        real = store.put
        def put(key, data, **kw):
            if key.endswith("/bundle.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            real(key, data, **kw)
        store.put = put
        publish_bundle(Path({str(bundle_dir)!r}), store)
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL


def clean(registry: Path, *extra: str) -> str:
    config = registry.parent / "annotator.toml"
    config.write_text(f'[store]\nroot = "{registry.parent / "store"}"\n')
    done = subprocess.run([sys.executable, "-m", "service.cli", "models", "clean-registry", "--config", str(config),
                           "--registry", str(registry), *extra], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_publication_killed_before_bundle_json_is_listed_then_removed_on_request(tmp_path: Path) -> None:
    """A kill -9 between the model files and bundle.json left 18 MB that no bundle.json names
    in the registry for good: nothing listed, pulled or removed it. ``clean-registry`` lists
    it (dry run), leaves it while a day has not passed (a publication may be running), and
    with ``--apply`` removes it; a published bundle beside it is never touched."""
    registry = tmp_path / "registry"
    published = publish_bundle(DEMO, LocalFolderStore(registry))
    good = sorted(p for p in (registry / "bundles" / published.bundle_id).rglob("*") if p.is_file())
    (registry / "bundles" / published.bundle_id).rename(registry / "bundles" / "keep")  # the orphan's id is free
    killed_publication(registry, DEMO)
    (registry / "bundles" / "keep").rename(registry / "bundles" / "good-bundle")
    orphan = registry / "bundles" / published.bundle_id
    assert sorted(p.name for p in orphan.iterdir()) == ["head.onnx", "pose_main.onnx", "pose_visible.onnx"]
    assert BundleRegistry(LocalFolderStore(registry)).bundle_ids() == ["good-bundle"]

    out = clean(registry)  # young: may be a publication running
    assert f"left  bundles/{published.bundle_id}/" in out and "nothing to remove" in out
    old = time.time() - 2 * 86400
    for path in [*orphan.rglob("*"), *(registry / "bundles" / "good-bundle").rglob("*")]:
        os.utime(path, (old, old))
    out = clean(registry)
    assert f"would remove  bundles/{published.bundle_id}/  3 objects" in out and "--apply" in out
    assert orphan.is_dir() and len(list(orphan.iterdir())) == 3  # a dry run
    out = clean(registry, "--apply")
    assert f"removed  bundles/{published.bundle_id}/" in out
    assert not orphan.exists()
    assert [p.name for p in sorted((registry / "bundles" / "good-bundle").rglob("*"))] == [p.name for p in good]
    assert "no interrupted publication" in clean(registry)


def test_an_orphan_in_a_bucket_is_found_by_its_objects_times_and_left_when_published_meanwhile(
        moto_server: S3Server) -> None:
    from sync.s3store import S3Store

    store = S3Store(moto_server.new_bucket(), "registry", client=moto_server.client())
    store.put("bundles/b-1/bundle.json", b"{}")
    store.put("bundles/b-1/head.onnx", b"model")
    store.put("bundles/b-2/head.onnx", b"cut short")
    registry = BundleRegistry(store)
    assert registry.orphans() == []  # written just now
    (orphan,) = registry.orphans(0.0)
    assert orphan.bundle_id == "b-2" and orphan.keys == ("bundles/b-2/head.onnx",) and orphan.size == 9
    store.put("bundles/b-2/bundle.json", b"{}")  # published again meanwhile: left
    assert not registry.remove_orphan(orphan, 0.0)
    store.delete("bundles/b-2/bundle.json")
    assert registry.remove_orphan(orphan, 0.0)
    assert list(store.list("bundles/")) == ["bundles/b-1/bundle.json", "bundles/b-1/head.onnx"]


def test_a_registry_opened_one_folder_too_high_is_never_an_orphan(tmp_path: Path) -> None:
    """Bundles published under the prefix ``bundles`` (the example config's) and
    ``clean-registry --registry`` given the folder above it: every bundle lay under
    ``bundles/bundles/<id>/``, which had no ``bundle.json`` at its own level, and ``--apply``
    removed all of them. A folder with a ``bundle.json`` at any depth is never an orphan."""
    registry = tmp_path / "registry"
    from procs import demo_bundle_copy

    for bid in ("bundle-a", "bundle-b"):
        publish_bundle(demo_bundle_copy(tmp_path / "src" / bid, bid), LocalFolderStore(registry, "bundles"))
    old = time.time() - 3 * 86400
    for p in registry.rglob("*"):
        os.utime(p, (old, old))
    assert "no interrupted publication" in clean(registry)
    assert "no interrupted publication" in clean(registry, "--apply")
    assert BundleRegistry(LocalFolderStore(registry, "bundles")).bundle_ids() == ["bundle-a", "bundle-b"]
