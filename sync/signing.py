"""Ed25519 signatures over a bundle's ``bundle.json`` bytes (``cryptography``).

``bundle.sig`` holds the 64-byte signature, raw or as base64 text. A public key file holds the
key as PEM (``-----BEGIN PUBLIC KEY-----``), as 32 raw bytes, or as base64 / hex text of those
32 bytes. The manifest names every model file with its sha256, so a valid signature over it
covers the ONNX files too (their checksums are verified by ``service.bundle.load_bundle``).
"""
from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SyncConfigError

log = logging.getLogger(__name__)


class SignatureError(ValueError):
    """A signature is missing, malformed or does not match."""


def _decode_text(data: bytes, size: int) -> bytes | None:
    text = data.strip()
    for decode in (base64.b64decode, binascii.unhexlify):
        try:
            raw = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == size:
            return raw
    return None


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key (PEM, raw 32 bytes, base64 or hex); ``SyncConfigError`` when unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SyncConfigError(f"models.public_key: cannot read {path}: {exc}") from exc
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise SyncConfigError(f"models.public_key: {path} is a {type(key).__name__}, expected an ed25519 key")
            return key
        raw = data if len(data) == 32 else _decode_text(data, 32)
        if raw is None:
            raise SyncConfigError(f"models.public_key: {path} is neither PEM nor 32 raw/base64/hex bytes")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SyncConfigError(f"models.public_key: {path}: {exc}") from exc


def verify_manifest(manifest: bytes, signature: bytes | None, key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``signature`` is a valid ed25519 signature of ``manifest``."""
    if signature is None:
        raise SignatureError("bundle.sig is missing but a public key is configured")
    raw = signature if len(signature) == 64 else _decode_text(signature, 64)
    if raw is None:
        raise SignatureError(f"bundle.sig is not a 64-byte ed25519 signature (raw or base64); got {len(signature)} bytes")
    try:
        key.verify(raw, manifest)
    except InvalidSignature as exc:
        raise SignatureError("bundle.sig does not match bundle.json (tampered, or signed with another key)") from exc


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The raw 64-byte signature (publishing side; also used by the tests)."""
    return key.sign(manifest)


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
