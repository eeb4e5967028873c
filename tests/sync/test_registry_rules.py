"""The registry's rules, reproduced against real files, a real bucket (moto on loopback) and the
real CLI: one name rule for bundle ids and bundle file names; a signature vouches for the
training checkpoints too; a local registry folder that does not exist is an error; and
``clean-registry`` aborts the multipart uploads killed publications left."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from s3servers import S3Server
from service.bundle import Bundle, load_bundle, sha256_file, write_bundle
from service.errors import BundleError
from sync.errors import PermanentError
from sync.models import ModelPuller, ModelSlots
from sync.objectstore import LocalFolderStore
from sync.publish import publish_bundle
from sync.registry import BundleRegistry
from sync.signing import public_key_pem, sign_manifest

ROOT = Path(__file__).resolve().parents[2]


def variant(base: Bundle, folder: Path, **changes: object) -> Path:
    shutil.copytree(base.path, folder)
    write_bundle(dataclasses.replace(load_bundle(folder), **changes))
    return folder


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "YOLO_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "service.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# -- 1. one name rule ------------------------------------------------------------------------
def test_an_id_too_long_for_a_folder_is_refused_before_it_is_published(moto_server: S3Server, tmp_path: Path,
                                                                       pose_bundle: Bundle) -> None:
    """100 CJK characters: 300 bytes, within the 200-character limit. It was published to the
    bucket, then every pull stopped with ENAMETOOLONG on staging/.<id>.partial (refusing
    nothing: refused/<id>.reason.txt is too long too), so no later bundle came either. One
    rule in bytes: the publication is refused, and a folder an older version published is left
    out of the listing while the pull takes the next bundle."""
    from sync.s3store import S3Store

    long_id = "模型" * 50
    store = S3Store(moto_server.new_bucket(), "registry", client=moto_server.client())
    folder = tmp_path / "long"
    shutil.copytree(pose_bundle.path, folder)
    data = json.loads((folder / "bundle.json").read_text())
    (folder / "bundle.json").write_text(json.dumps({**data, "id": long_id, "created": "2099-01-01T00:00:00Z"}))
    with pytest.raises(BundleError, match=r"bundle id .* is not a plain folder name \(100 characters, 300 bytes of UTF-8"):
        publish_bundle(folder, store)
    assert list(store.list("bundles/")) == []
    for name in ("bundle.json", pose_bundle.models["pose_main"].file):  # as an older version published it
        store.put(f"bundles/{long_id}/{name}", folder / name)
    good = variant(pose_bundle, tmp_path / "good", id="b-good", created="2030-01-01T00:00:00Z")
    publish_bundle(good, store)
    puller = ModelPuller(ModelSlots(tmp_path / "models"), BundleRegistry(store), None, lambda path: None)
    assert puller.pull_once().switched_to == "b-good"


def test_an_id_an_earlier_release_installed_still_loads(tmp_path: Path, pose_bundle: Bundle) -> None:
    """Review: the rule in bytes was 200, and a 70-character CJK id (210 bytes, every name made
    from it under 255) that the previous release installed as current stopped the daemon's start."""
    from service.bundle import load_bundle

    ok = variant(pose_bundle, tmp_path / "ok", id="相机" * 35)
    assert load_bundle(ok).id == "相机" * 35
    too_long = variant(pose_bundle, tmp_path / "long", id="相机" * 41)  # 82 characters, 246 bytes
    with pytest.raises(BundleError, match="82 characters, 246 bytes"):
        load_bundle(too_long)


@pytest.mark.parametrize("name", ["pose\\main.onnx", ".pose_main.onnx", "é" * 125 + ".onnx"])
def test_a_model_file_name_the_registry_would_refuse_is_refused_at_load(tmp_path: Path, pose_bundle: Bundle,
                                                                        name: str) -> None:
    """A bundle naming ``pose\\main.onnx`` loaded (and was adopted) but its publication stopped
    halfway with the object store's ValueError, and the pull refused it: the loader now holds
    file names to the registry's rule, with the same message."""
    folder = tmp_path / "b"
    shutil.copytree(pose_bundle.path, folder)
    data = json.loads((folder / "bundle.json").read_text())
    os.rename(folder / data["models"]["pose_main"]["file"], folder / name)
    data["models"]["pose_main"]["file"] = name
    (folder / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"models\.pose_main\.file: file name .* is not a plain file name"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="is not a plain file name"):
        publish_bundle(folder, LocalFolderStore(tmp_path / "registry"))
    assert not (tmp_path / "registry" / "bundles").exists()


# -- 2. a signature vouches for the checkpoints ----------------------------------------------
def _keys(tmp_path: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "registry.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "registry.pub").write_bytes(public_key_pem(key))
    return tmp_path / "registry.key", tmp_path / "registry.pub"


def _with_weights(base: Bundle, folder: Path, bid: str, sha: bool) -> Path:
    shutil.copytree(base.path, folder)
    (folder / "weights").mkdir()
    (folder / "weights" / "pose_main.pt").write_bytes(b"a pickle: code when loaded")
    entry = {"file": "weights/pose_main.pt", **({"sha256": sha256_file(folder / "weights" / "pose_main.pt")}
                                                 if sha else {})}
    write_bundle(dataclasses.replace(load_bundle(folder), id=bid, created="2030-01-01T00:00:00Z",
                                     lineage={**base.lineage, "weights": {"pose_main": entry}}))
    return folder


def test_a_signed_bundle_whose_checkpoint_has_no_sha256_is_refused(tmp_path: Path, pose_bundle: Bundle) -> None:
    """A hand-made bundle.json naming weights/pose_main.pt without its sha256, signed: the pull
    installed the checkpoint unchecked under a valid signature (``train --init current``
    unpickles it). Refused now at the pull and at adopt, and publishing refuses to sign it."""
    sign_key, public = _keys(tmp_path)
    folder = _with_weights(pose_bundle, tmp_path / "b", "b-nosha", sha=False)
    store = LocalFolderStore(tmp_path / "registry")
    with pytest.raises(PermanentError, match="cannot vouch for: pose_main \\(weights/pose_main.pt\\)"):
        publish_bundle(folder, store, sign_key=sign_key)
    assert list(store.list("bundles/")) == []
    publish_bundle(folder, store)  # unsigned: as before
    manifest = (folder / "bundle.json").read_bytes()
    store.put("bundles/b-nosha/bundle.sig", sign_manifest(manifest, serialization.load_pem_private_key(
        sign_key.read_bytes(), None)))  # type: ignore[arg-type]
    (folder / "bundle.sig").write_bytes(store.get("bundles/b-nosha/bundle.sig"))
    slots = ModelSlots(tmp_path / "models")
    puller = ModelPuller(slots, BundleRegistry(store), None, lambda path: None, public_key=public)
    result = puller.pull_once()
    assert result.switched_to is None and "cannot vouch for" in result.refused["b-nosha"]
    assert "publish it under a new id" in result.refused["b-nosha"]
    adopter = ModelPuller(ModelSlots(tmp_path / "other"), BundleRegistry(store), None, lambda path: None,
                          public_key=public)
    with pytest.raises(BundleError, match="cannot vouch for.*--unsigned"):
        adopter.adopt(folder)
    assert adopter.slots.current_path() is None


def test_bundles_train_publishes_still_pass_and_adopt_keeps_only_vouched_checkpoints(
        tmp_path: Path, pose_bundle: Bundle) -> None:
    """What ``annotator train`` makes (every checkpoint with its sha256) and ``annotator bundle``
    makes (no checkpoints) are published signed and pulled as before. Adopt copied the whole
    folder: a checkpoint changed after signing, or one no entry names, went in with it; now it
    is left out, as the pull leaves it."""
    sign_key, public = _keys(tmp_path)
    store = LocalFolderStore(tmp_path / "registry")
    plain = variant(pose_bundle, tmp_path / "plain", id="b-plain", created="2030-01-01T00:00:00Z")
    trained = _with_weights(pose_bundle, tmp_path / "trained", "b-trained", sha=True)
    write_bundle(dataclasses.replace(load_bundle(trained), created="2031-01-01T00:00:00Z"))
    for folder in (plain, trained):
        assert publish_bundle(folder, store, sign_key=sign_key).signed
    puller = ModelPuller(ModelSlots(tmp_path / "models"), BundleRegistry(store), None, lambda path: None,
                         public_key=public)
    assert puller.pull_once().switched_to == "b-trained"
    assert (puller.slots.current_path() / "weights" / "pose_main.pt").read_bytes() == b"a pickle: code when loaded"

    (trained / "weights" / "pose_main.pt").write_bytes(b"changed after signing")
    (trained / "weights" / "pose_visible.pt").write_bytes(b"named nowhere")
    adopter = ModelPuller(ModelSlots(tmp_path / "adopted"), BundleRegistry(store), None, lambda path: None,
                          public_key=public)
    assert adopter.adopt(trained) == "b-trained"
    assert not (adopter.slots.current_path() / "weights").exists() or \
        list((adopter.slots.current_path() / "weights").iterdir()) == []
    assert adopter.adopt(plain) == "b-plain"


# -- 3. a local registry that does not exist -------------------------------------------------
def test_a_registry_folder_that_does_not_exist_is_said(tmp_path: Path) -> None:
    """``[sync.models.registry] root`` mistyped: ``models list`` says so, ``models pull`` and
    ``clean-registry`` refuse to run (``registry_problem``); one the agent publishes into
    (``[sync.training]``) is created by its first publication: not a problem."""
    from sync.config import TargetConfig
    from sync.models_cli import registry_problem

    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n[sync.models]\n[sync.models.registry]\n'
                      f'kind = "local"\nroot = "{tmp_path / "model-registyr"}"\n')
    listed = cli("models", "list", "--config", str(config))
    assert f"model registry {tmp_path / 'model-registyr'} is not a folder" in listed.stdout, listed.stderr
    pulled = cli("models", "pull", "--once", "--config", str(config))
    assert pulled.returncode != 0 and "is not a folder" in pulled.stderr
    registry = TargetConfig(kind="local", root=tmp_path / "registry", prefix="models")
    (tmp_path / "registry").mkdir()
    assert "registry/models is not a folder" in str(registry_problem(registry))
    assert registry_problem(registry, publishing=True) is None
    (tmp_path / "registry" / "models").mkdir()
    assert registry_problem(registry) is None


# -- 4. multipart uploads killed publications left --------------------------------------------
def test_clean_registry_aborts_the_uploads_of_killed_publications(moto_server: S3Server, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A publication killed while a model file went up in parts leaves a multipart upload that
    no object listing shows and S3 bills for ever. Two days old by the bucket's clock (alone
    in its folder, or beside an orphan's file, or in a published bundle's folder): aborted with
    ``--apply``, listed without. An old upload in a folder a publication writes to now, a
    young one, and one outside ``bundles/`` stay."""
    import moto.s3.models

    from sync.s3store import S3Store

    bucket = moto_server.new_bucket()
    client = moto_server.client()
    store = S3Store(bucket, "registry", client=client)
    part = b"x" * (5 << 20)

    def upload(key: str) -> str:
        up = client.create_multipart_upload(Bucket=bucket, Key=f"registry/{key}")["UploadId"]
        client.upload_part(Bucket=bucket, Key=f"registry/{key}", UploadId=up, PartNumber=1, Body=part)
        return up

    two_days_ago = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(days=2)
    with monkeypatch.context() as m:
        m.setattr(moto.s3.models, "utcnow", lambda: two_days_ago)
        upload("bundles/alone/pose_main.onnx")
        store.put("bundles/orphan/head.onnx", b"done")
        upload("bundles/orphan/pose_main.onnx")
        store.put("bundles/published/bundle.json", b"{}")
        upload("bundles/published/pose_main.onnx")
        upload("bundles/running/pose_main.onnx")  # killed earlier; the same id is being published now
        upload("images/abc.jpg")  # the uploader's, sharing the prefix
    store.put("bundles/running/head.onnx", b"written now")
    upload("bundles/young/pose_main.onnx")
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n[sync.models]\n[sync.models.registry]\n'
                      f'kind = "s3"\nbucket = "{bucket}"\nprefix = "registry"\n'
                      f'endpoint_url = "{moto_server.endpoint_url}"\n')
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    def pending() -> list[str]:
        return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    before = pending()
    dry = cli("models", "clean-registry", "--config", str(config))
    assert dry.returncode == 0, dry.stderr
    for key in ("alone", "orphan", "published"):
        assert f"would abort  bundles/{key}/pose_main.onnx  multipart upload, 5.2 MB in parts" in dry.stdout, dry.stdout
    assert "left  bundles/running/pose_main.onnx" in dry.stdout and "left  bundles/young/pose_main.onnx" in dry.stdout
    assert pending() == before
    done = cli("models", "clean-registry", "--config", str(config), "--apply")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("aborted  bundles/") == 3, done.stdout
    assert pending() == ["registry/bundles/running/pose_main.onnx", "registry/bundles/young/pose_main.onnx",
                         "registry/images/abc.jpg"]
    assert list(store.list("bundles/")) == ["bundles/published/bundle.json", "bundles/running/head.onnx"]


def test_the_agent_and_doctor_warn_of_a_registry_folder_that_does_not_exist(tmp_path: Path) -> None:
    """The agent started, its model pull read an empty registry at every pass, and doctor said
    OK: a typo meant no new model for good. Now doctor WARNs and the agent's start says it; the
    agent still starts (a registry the first publication makes later is a normal set-up, and the
    uploads must not wait for it)."""
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n[sync.models]\n[sync.models.registry]\n'
                      f'kind = "local"\nroot = "{tmp_path / "model-registyr"}"\n')
    started = cli("sync", "--config", str(config), "--once")
    assert started.returncode == 0 and f"model registry {tmp_path / 'model-registyr'} is not a folder" in \
        started.stderr, started.stderr  # HEAD: not a word
    doctor = cli("doctor", "--config", str(config))
    assert any(line.startswith("sync ") and "WARN" in line and "is not a folder" in line
               for line in doctor.stdout.splitlines()), doctor.stdout  # HEAD: OK
    (tmp_path / "model-registyr").mkdir()
    again = cli("sync", "--config", str(config), "--once")
    assert again.returncode == 0 and "is not a folder" not in again.stderr
