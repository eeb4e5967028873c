"""Bundle signatures (ed25519 over bundle.json) checked by the daemon when
``engine.bundle_public_key`` is set: at start-up and at every reload."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.errors import BundleError, ConfigError
from service.signing import SignatureError, public_key_pem, sign_manifest, verify_manifest


def signed_copy(src: Path, dest: Path, key: Ed25519PrivateKey | None) -> Path:
    """A copy of the bundle at ``src``, with a ``bundle.sig`` by ``key`` (None: unsigned)."""
    shutil.copytree(src, dest)
    (dest / "bundle.sig").unlink(missing_ok=True)
    if key is not None:
        (dest / "bundle.sig").write_bytes(sign_manifest((dest / "bundle.json").read_bytes(), key))
    return dest


def test_verify_manifest_accepts_raw_and_base64_and_refuses_the_rest() -> None:
    import base64

    key = Ed25519PrivateKey.generate()
    sig = sign_manifest(b"{}", key)
    verify_manifest(b"{}", sig, key.public_key())
    verify_manifest(b"{}", base64.b64encode(sig) + b"\n", key.public_key())
    for manifest, signature, match in ((b"{ }", sig, "does not match"), (b"{}", None, "missing"),
                                       (b"{}", b"short", "64-byte")):
        with pytest.raises(SignatureError, match=match):
            verify_manifest(manifest, signature, key.public_key())


def test_sync_signing_reexports_the_service_functions() -> None:
    import service.signing
    import sync.signing

    assert sync.signing.SignatureError is service.signing.SignatureError
    assert sync.signing.verify_manifest is service.signing.verify_manifest


def test_daemon_loads_and_reloads_only_signed_bundles(tmp_path: Path, pose_bundle: Any,
                                                      make_config: Callable[..., Any]) -> None:
    from service.daemon import Daemon

    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "registry.pub"
    pub.write_bytes(public_key_pem(key))
    good = signed_copy(pose_bundle.path, tmp_path / "bundles" / "good", key)
    daemon = Daemon(make_config(engine__bundle=str(good), engine__bundle_public_key=str(pub)), workers=1)
    try:
        assert daemon.reload().id == pose_bundle.id  # re-read and re-verified
        unsigned = signed_copy(pose_bundle.path, tmp_path / "bundles" / "unsigned", None)
        other = signed_copy(pose_bundle.path, tmp_path / "bundles" / "other-key", Ed25519PrivateKey.generate())
        tampered = signed_copy(pose_bundle.path, tmp_path / "bundles" / "tampered", key)
        (tampered / "bundle.json").write_bytes((tampered / "bundle.json").read_bytes() + b"\n")
        for bundle, match in ((unsigned, "missing"), (other, "does not match"), (tampered, "does not match")):
            with pytest.raises(BundleError, match=match):
                daemon.reload(str(bundle))
            assert daemon.status().bundle_path == str(good)  # the old bundle stays in use
    finally:
        daemon.close()

    with pytest.raises(BundleError, match="bundle.sig is missing"):
        Daemon(make_config(engine__bundle=str(unsigned), engine__bundle_public_key=str(pub)), workers=1)
    (tmp_path / "garbage.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="engine.bundle_public_key"):
        Daemon(make_config(engine__bundle=str(good), engine__bundle_public_key=str(tmp_path / "garbage.pub")))
