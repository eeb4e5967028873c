"""``annotator train --publish`` killed, out of disk, or pointed at a registry it cannot use.

The training and the bundle build are replaced (a real bundle, ``coco17_bundle``, stands in
for what they make) so that the point, the publication, runs in seconds: a kill is a
BaseException raised from the store's ``put`` that nothing in the code catches, like kill -9
(nothing after it runs). Local folder and the loopback S3 (moto) registry alike."""
from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from service.keypoints import CABIN19_NAMES
from sync.objectstore import LocalFolderStore
from sync.publish import open_registry
from sync.registry import BundleRegistry


class _Killed(BaseException):
    """kill -9 of the process: nothing catches it, nothing after it runs."""


def _export(root: Path, n: int = 6) -> Path:
    (root / "images").mkdir(parents=True)
    ims, anns = [], []
    for i in range(1, n + 1):
        ims.append({"id": i, "file_name": f"im{i}.jpg", "width": 64, "height": 48})
        (root / "images" / f"im{i}.jpg").write_bytes(b"\xff\xd8fake")
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 30], "iscrowd": 0,
                     "keypoints": [10, 10, 2] * len(CABIN19_NAMES), "num_keypoints": len(CABIN19_NAMES)})
    (root / "annotations.json").write_text(json.dumps({
        "images": ims, "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": list(CABIN19_NAMES), "skeleton": []}]}))
    return root


@pytest.fixture()
def fake_pipeline(monkeypatch: pytest.MonkeyPatch, coco17_bundle: Any) -> dict[str, int]:
    """train_role writes a fixed checkpoint; build_bundle copies ``coco17_bundle`` under a new id
    with the lineage it is given; calibration keeps the bundle. Counts the builds."""
    from service.bundle import load_bundle, new_bundle_id, write_bundle

    seen = {"trained": 0, "built": 0}

    def train_role(cfg: Any, role: str, data_yaml: Path, kpt_names: Any = None) -> Path:
        seen["trained"] += 1
        ck = cfg.work / "runs" / f"{role}.pt"
        ck.parent.mkdir(parents=True, exist_ok=True)
        ck.write_bytes(f"checkpoint of {role}".encode())
        return ck

    def build_bundle(out_dir: Path, **kw: Any) -> Any:
        seen["built"] += 1
        shutil.copytree(coco17_bundle.path, out_dir)
        b = load_bundle(out_dir)
        write_bundle(dataclasses.replace(b, path=Path(out_dir), id=new_bundle_id(str(out_dir)), lineage=kw["lineage"]))
        return load_bundle(out_dir)

    monkeypatch.setattr("exporter.train.train_role", train_role)
    monkeypatch.setattr("exporter.bundle_build.build_bundle", build_bundle)
    monkeypatch.setattr("exporter.calibrate_bundle.calibrate_bundle", lambda bundle, *a, **kw: bundle)
    return seen


@pytest.fixture(params=["folder", "s3"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[list[str], Any, type]]:
    """(the --publish arguments, the registry's store, the store class whose put a kill hits)."""
    if request.param == "folder":
        yield [str(tmp_path / "registry")], LocalFolderStore(tmp_path / "registry"), LocalFolderStore
        return
    moto = request.getfixturevalue("moto_server")
    request.getfixturevalue("s3_env")
    from sync.s3store import S3Store

    uri = f"s3://{moto.new_bucket()}/models/registry"
    yield [uri, "--registry-endpoint", moto.endpoint_url], open_registry(uri, endpoint_url=moto.endpoint_url), S3Store


def _train(tmp_path: Path, publish: list[str]) -> int:
    from service.cli import main

    return main(["train", str(tmp_path / "export"), str(tmp_path / "out"), "--roles", "pose_main",
                 "--publish", *publish])


@pytest.mark.parametrize("killed_after", ["pose_main.onnx", "bundle.json"])
def test_a_publication_killed_midway_is_never_listed_and_the_rerun_publishes_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pipeline: dict[str, int],
        registry: tuple[list[str], Any, type], killed_after: str) -> None:
    """kill -9 after the first object (or after bundle.json) landed: the agent lists no partial
    bundle; re-running the same command completes that very bundle, and the registry ends with
    exactly one bundle and no other bundle's files (no second bundle of the same training, no
    first one's model files left there for good)."""
    publish, store, store_class = registry
    _export(tmp_path / "export")
    put = store_class.put

    def killing_put(self: Any, key: str, *a: Any, **kw: Any) -> None:
        put(self, key, *a, **kw)
        if key.endswith("/" + killed_after):
            raise _Killed(key)

    monkeypatch.setattr(store_class, "put", killing_put)
    with pytest.raises(_Killed):
        _train(tmp_path, publish)
    listed = BundleRegistry(store).bundle_ids()
    if killed_after == "bundle.json":  # listed only once complete: the agent can pull it
        assert len(listed) == 1 and BundleRegistry(store).download(listed[0], tmp_path / "early").is_dir()
    else:
        assert listed == []
    monkeypatch.setattr(store_class, "put", put)

    for _ in range(2):  # the re-run after the kill, then once more after a complete run
        assert _train(tmp_path, publish) == 0
        ids = BundleRegistry(store).bundle_ids()
        assert len(ids) == 1, ids
        folders = {key.split("/")[1] for key in store.list("bundles/")}
        assert folders == set(ids), f"files of another bundle left in the registry: {sorted(folders - set(ids))}"
    assert fake_pipeline["trained"] == 3 and fake_pipeline["built"] == 1  # built once, published once
    from service.bundle import load_bundle

    assert load_bundle(BundleRegistry(store).download(ids[0], tmp_path / "pulled")).id == ids[0]


def test_a_full_registry_disk_names_the_path_and_lists_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pipeline: dict[str, int],
        capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC from the registry folder mid-publish: exit 2, one line naming the registry and
    the object, no traceback, nothing listed; after space is freed the re-run publishes it."""
    _export(tmp_path / "export")
    reg = tmp_path / "registry"
    put = LocalFolderStore.put

    def full_put(self: Any, key: str, *a: Any, **kw: Any) -> None:
        if key.endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        put(self, key, *a, **kw)

    monkeypatch.setattr(LocalFolderStore, "put", full_put)
    assert _train(tmp_path, [str(reg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("annotator train: error: ") and "Traceback" not in err
    assert str(reg) in err and "weights/pose_main.pt" in err and "No space left" in err
    assert BundleRegistry(LocalFolderStore(reg)).bundle_ids() == []
    monkeypatch.setattr(LocalFolderStore, "put", put)
    assert _train(tmp_path, [str(reg)]) == 0 and len(BundleRegistry(LocalFolderStore(reg)).bundle_ids()) == 1


def test_a_missing_bucket_is_said_before_training(tmp_path: Path, fake_pipeline: dict[str, int], moto_server: Any,
                                                  s3_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    _export(tmp_path / "export")
    rc = _train(tmp_path, ["s3://no-such-bucket-here/registry", "--registry-endpoint", moto_server.endpoint_url])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-bucket-here" in err and "Traceback" not in err
    assert "fix the registry address s3://no-such-bucket-here/registry" in err and "[sync.target]" not in err
    assert fake_pipeline["trained"] == 0  # not hours of training first
