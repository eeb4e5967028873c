"""Publishing bundles to the registry (folder and S3), signed; ``--init current`` resolution."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exporter.train_cli import resolve_init
from s3servers import S3Server
from service.bundle import Bundle, load_bundle, sha256_file, write_bundle
from service.errors import AnnotatorError
from sync.errors import SyncConfigError
from sync.models import ModelPuller, ModelSlots
from sync.objectstore import LocalFolderStore
from sync.publish import open_registry, publish_bundle
from sync.registry import BundleRegistry
from sync.signing import public_key_pem

pytestmark = pytest.mark.slow


def with_weights(base: Bundle, folder: Path) -> Path:
    """A copy of ``base`` whose lineage names a (fake) training checkpoint, as train_bundle writes."""
    shutil.copytree(base.path, folder)
    (folder / "weights").mkdir(exist_ok=True)
    (folder / "weights" / "pose_main.pt").write_bytes(b"checkpoint bytes")
    weights = {"pose_main": {"file": "weights/pose_main.pt", "sha256": sha256_file(folder / "weights" / "pose_main.pt")}}
    write_bundle(dataclasses.replace(load_bundle(folder), lineage={**base.lineage, "weights": weights}))
    return folder


def write_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def test_signed_publication_is_pulled_with_its_weights(tmp_path: Path, pose_bundle: Bundle) -> None:
    bundle_dir = with_weights(pose_bundle, tmp_path / "bundle")
    key = write_key(tmp_path / "registry.key")
    (tmp_path / "registry.pub").write_bytes(public_key_pem(key))
    store = open_registry(tmp_path / "registry")
    result = publish_bundle(bundle_dir, store, sign_key=tmp_path / "registry.key")
    bid = load_bundle(bundle_dir).id
    assert result.signed and result.keys[-1] == f"bundles/{bid}/bundle.json"  # the manifest last
    assert f"bundles/{bid}/weights/pose_main.pt" in result.keys

    reloaded: list[str] = []
    puller = ModelPuller(ModelSlots(tmp_path / "models"), BundleRegistry(store), None, reloaded.append,
                         public_key=tmp_path / "registry.pub")
    assert puller.pull_once().switched_to == bid and reloaded
    current = puller.slots.current_path()
    assert current is not None and (current / "weights" / "pose_main.pt").read_bytes() == b"checkpoint bytes"
    assert resolve_init("current", None, tmp_path / "models") == str(current)

    # Re-published unsigned: the stale signature goes, so a key-less agent is not misled by it.
    publish_bundle(bundle_dir, store)
    assert not (tmp_path / "registry" / "bundles" / bid / "bundle.sig").exists()


def test_publish_to_s3_and_bad_registry_addresses(tmp_path: Path, pose_bundle: Bundle, moto_server: S3Server,
                                                  s3_env: None) -> None:
    bucket = moto_server.new_bucket()
    store = open_registry(f"s3://{bucket}/models/registry", endpoint_url=moto_server.endpoint_url)
    publish_bundle(pose_bundle.path, store)
    registry = BundleRegistry(store)
    assert registry.bundle_ids() == [pose_bundle.id]
    assert load_bundle(registry.download(pose_bundle.id, tmp_path / "pulled")).id == pose_bundle.id
    for bad in ("s3://", "http://host/registry"):
        with pytest.raises(SyncConfigError, match="registry"):
            open_registry(bad)
    (tmp_path / "not-ed25519.pem").write_text("not a key")
    with pytest.raises(SyncConfigError, match="sign key"):
        publish_bundle(pose_bundle.path, LocalFolderStore(tmp_path / "r2"), sign_key=tmp_path / "not-ed25519.pem")


def test_init_current_from_the_config(tmp_path: Path, pose_bundle: Bundle) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text('[store]\nroot = "store"\n[sync.models]\nroot = "slots"\n')
    with pytest.raises(AnnotatorError, match="no bundle in use"):
        resolve_init("current", config, None)
    ModelPuller(ModelSlots(tmp_path / "slots"), BundleRegistry(LocalFolderStore(tmp_path / "none")), None,
                lambda p: None).adopt(pose_bundle.path)
    assert resolve_init("current", config, None) == str((tmp_path / "slots" / "bundles" / pose_bundle.id).resolve())
    assert resolve_init("pretrained", config, None) == "pretrained"
    with pytest.raises(AnnotatorError, match="not a bundle directory"):
        resolve_init(str(tmp_path / "nowhere"), config, None)
