"""Ed25519 signatures over a bundle's ``bundle.json`` bytes (``cryptography``).

``bundle.sig`` holds the 64-byte signature, raw or as base64 text. A public key file holds the
key as PEM (``-----BEGIN PUBLIC KEY-----``), as 32 raw bytes, or as base64 / hex text of those
32 bytes. The manifest names every model file with its sha256, so a valid signature over it
covers the ONNX files too (their checksums are verified by ``service.bundle.load_bundle``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from service import signing as service_signing
from service.errors import ConfigError
# The pure functions live in service.signing (the daemon verifies bundles too); re-exported here.
from service.signing import SignatureError, parse_public_key, public_key_pem, sign_manifest, verify_manifest  # noqa: F401

from .errors import SyncConfigError

log = logging.getLogger(__name__)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key (PEM, raw 32 bytes, base64 or hex); ``SyncConfigError`` when unusable."""
    try:
        return service_signing.load_public_key(path, key_name="models.public_key")
    except ConfigError as exc:
        raise SyncConfigError(str(exc)) from exc
