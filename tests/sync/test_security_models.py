"""Bundles an operator adopts or the registry serves, shaped by someone careless or hostile
(issue: security audit). ``bundle.json``'s id names folders under the models root: an id
``../../victim`` made ``annotator models adopt`` remove a folder outside it and copy the bundle
there. A model keeping its weights in another file (ONNX external data) passed the checksums
and the signature with that file changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.bundle import load_bundle, sha256_file
from service.cli_daemon import DEMO_BUNDLE
from service.errors import BundleError
from service.signing import public_key_pem, sign_manifest, verify_bundle_dir
from sync.models import ModelPuller, ModelSlots
from sync.objectstore import LocalFolderStore
from sync.registry import BundleRegistry

pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "head.onnx").is_file(), reason="needs the shipped demo bundle")


def _copy(tmp_path: Path, name: str = "incoming") -> tuple[Path, dict]:
    folder = tmp_path / name
    shutil.copytree(DEMO_BUNDLE, folder)
    return folder, json.loads((folder / "bundle.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("bad_id", ["../../victim", "..", ".", "", "a/b", "a\\b", ".hidden", "x\x00y", "x" * 201])
def test_adopt_refuses_a_bundle_id_that_is_not_a_plain_folder_name(tmp_path: Path, bad_id: str) -> None:
    victim = tmp_path / "data" / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    bundle, data = _copy(tmp_path)
    (bundle / "bundle.json").write_text(json.dumps(dict(data, id=bad_id)), encoding="utf-8")
    slots = ModelSlots(tmp_path / "data" / "models")
    puller = ModelPuller(slots, BundleRegistry(LocalFolderStore(tmp_path / "registry")), None, lambda path: None)
    with pytest.raises(BundleError, match="not a plain folder name"):
        puller.adopt(bundle)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert slots.current_path() is None and slots.installed() == []


def test_a_bundle_json_nested_thousands_deep_is_a_bundle_error(tmp_path: Path) -> None:
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "bundle.json").write_bytes(b"[" * 100_000)
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        load_bundle(folder)


def test_a_model_with_external_data_is_refused_even_when_signed(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from onnx.external_data_helper import convert_model_to_external_data

    from service.signing import parse_public_key

    bundle, data = _copy(tmp_path)
    model = onnx.load(str(bundle / "head.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="head.weights", size_threshold=1024)
    onnx.save_model(model, str(bundle / "head.onnx"))
    data["models"]["head"]["sha256"] = sha256_file(bundle / "head.onnx")
    (bundle / "bundle.json").write_text(json.dumps(data), encoding="utf-8")
    key = Ed25519PrivateKey.generate()
    (bundle / "bundle.sig").write_bytes(sign_manifest((bundle / "bundle.json").read_bytes(), key))
    weights = bytearray((bundle / "head.weights").read_bytes())
    weights[:4096] = bytes(4096)  # changed after signing: nothing in bundle.json covers this file
    (bundle / "head.weights").write_bytes(bytes(weights))
    verify_bundle_dir(bundle, parse_public_key(public_key_pem(key)))  # the signature holds
    with pytest.raises(BundleError, match="external data"):
        load_bundle(bundle)


def _publish(registry: Path, bundle_id: str, created: str, key) -> Path:
    import dataclasses

    from service.bundle import write_bundle

    folder = registry / "bundles" / bundle_id
    shutil.copytree(DEMO_BUNDLE, folder)
    write_bundle(dataclasses.replace(load_bundle(folder, verify=False), id=bundle_id, created=created))
    (folder / "bundle.sig").write_bytes(sign_manifest((folder / "bundle.json").read_bytes(), key))
    return folder


def test_an_old_signed_bundle_swapped_in_after_the_listing_is_not_pulled(tmp_path: Path) -> None:
    """A registry someone else can write lists a forged bundle.json (newer ``created``), then
    serves the old signed one to the download: the box went back to the old bundle."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    (tmp_path / "registry.pub").write_bytes(public_key_pem(key))
    registry = tmp_path / "registry"
    new = _publish(registry, "b-new", "2026-02-01T00:00:00Z", key)
    old = _publish(registry, "b-old", "2026-01-01T00:00:00Z", key)
    signed = (old / "bundle.json").read_bytes()
    forged = json.loads(signed)
    forged["created"] = "2099-01-01T00:00:00Z"
    (old / "bundle.json").write_text(json.dumps(forged), encoding="utf-8")

    class Swapping(BundleRegistry):
        def download(self, bundle_id: str, dest: Path) -> Path:
            (old / "bundle.json").write_bytes(signed)  # the bucket's object changes after the listing
            return super().download(bundle_id, dest)

    slots = ModelSlots(tmp_path / "data" / "models")
    puller = ModelPuller(slots, Swapping(LocalFolderStore(registry)), None, lambda path: None,
                         public_key=tmp_path / "registry.pub")
    puller.adopt(new)
    result = puller.pull_once()
    assert result.switched_to is None and "b-old" in result.refused, result
    assert "never pulled" in result.refused["b-old"]
    assert slots.current_path().name == "b-new"


def test_a_registry_entry_named_dotdot_never_removes_the_models_root(tmp_path: Path) -> None:
    """An S3 key ``bundles/../bundle.json`` lists a bundle id ``..``: refusing it removed
    ``staging/..``, the models root with every installed bundle and ``current``."""
    from sync.registry import RegistryEntry

    class Listing(BundleRegistry):
        def entries(self) -> list[RegistryEntry]:
            return [*super().entries(), RegistryEntry("..", "2099-01-01T00:00:00Z", None, "bundle.json is not valid JSON")]

    bundle, _ = _copy(tmp_path)
    slots = ModelSlots(tmp_path / "data" / "models")
    puller = ModelPuller(slots, Listing(LocalFolderStore(tmp_path / "registry")), None, lambda path: None)
    adopted = puller.adopt(bundle)
    result = puller.pull_once()
    assert result.switched_to is None and result.refused == {}
    assert slots.current_path() is not None and slots.current_path().name == adopted
    assert slots.installed() == [adopted]


def test_hostile_registry_objects_on_s3_do_not_stop_every_pull(tmp_path: Path, moto_server) -> None:
    """A key ``bundles/../bundle.json`` (listed as the id ``..``: reading it raised ValueError at
    every pull) and a bundle.json of 200k ``[`` (RecursionError at every pull): nothing was ever
    pulled again. Now the first is left out and the second refused; the good bundle still comes."""
    import dataclasses

    from service.bundle import write_bundle
    from sync.s3store import S3Store

    bucket = moto_server.new_bucket()
    client = moto_server.client()
    client.put_object(Bucket=bucket, Key="registry/bundles/../bundle.json", Body=b"{}")
    store = S3Store(bucket, "registry", client=client)
    store.put("bundles/b-deep/bundle.json", b"[" * 200_000)
    good = tmp_path / "good"
    shutil.copytree(DEMO_BUNDLE, good)
    write_bundle(dataclasses.replace(load_bundle(good, verify=False), id="b-good", created="2099-01-01T00:00:00Z"))
    for f in sorted(good.iterdir()):
        if f.is_file():
            store.put(f"bundles/b-good/{f.name}", f)
    slots = ModelSlots(tmp_path / "data" / "models")
    puller = ModelPuller(slots, BundleRegistry(store), None, lambda path: None)
    result = puller.pull_once()
    assert result.switched_to == "b-good", result  # HEAD: ValueError (a key with '..') out of pull_once
    assert [e.problem[:25] for e in BundleRegistry(store).entries() if e.bundle_id == "b-deep"] == \
        ["bundle.json is not valid "]


def test_a_model_file_larger_than_onnx_allows_is_refused_before_it_is_fetched(tmp_path: Path) -> None:
    """A 512 MiB object took the agent from 29 MB to 1 GB (held twice); one over protobuf's 2 GiB
    is not a model: refused from its size (a sparse file here: no disk, no memory)."""
    import dataclasses

    from service.bundle import write_bundle
    from sync.errors import BundleContentError
    from sync.registry import MAX_MODEL_BYTES

    folder = tmp_path / "registry" / "bundles" / "b-huge"
    shutil.copytree(DEMO_BUNDLE, folder)
    write_bundle(dataclasses.replace(load_bundle(folder, verify=False), id="b-huge"))
    with open(folder / "head.onnx", "r+b") as f:
        f.truncate(MAX_MODEL_BYTES + 1)
    registry = BundleRegistry(LocalFolderStore(tmp_path / "registry"))
    with pytest.raises(BundleContentError, match="more than an ONNX model in one file can be"):
        registry.download("b-huge", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
