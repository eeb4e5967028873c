"""Ed25519 signatures over a bundle's ``bundle.json`` bytes (``cryptography``), pure functions.

``bundle.sig`` holds the 64-byte signature, raw or as base64 text. A public key file holds the
key as PEM (``-----BEGIN PUBLIC KEY-----``), as 32 raw bytes, or as base64 / hex text of those
32 bytes. The manifest names every model file with its sha256, so a valid signature over it
covers the ONNX files too (their checksums are verified by ``service.bundle.load_bundle``).

The daemon verifies at load and reload when ``engine.bundle_public_key`` is set
(``verify_bundle_dir``); the sync agent's model pull (``sync.signing``) uses the same functions.
"""
from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BundleError, ConfigError

log = logging.getLogger(__name__)

MANIFEST, SIGNATURE = "bundle.json", "bundle.sig"


class SignatureError(ValueError):
    """A signature is missing, malformed or does not match."""


def decode_text(data: bytes, size: int) -> bytes | None:
    """``size`` bytes from base64 or hex text, or None when ``data`` is neither."""
    text = data.strip()
    for decode in (base64.b64decode, binascii.unhexlify):
        try:
            raw = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == size:
            return raw
    return None


def parse_public_key(data: bytes) -> Ed25519PublicKey:
    """An ed25519 public key from PEM, 32 raw bytes, or base64 / hex text; ``ValueError`` otherwise."""
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"a {type(key).__name__}, expected an ed25519 key")
        return key
    raw = data if len(data) == 32 else decode_text(data, 32)
    if raw is None:
        raise ValueError("neither PEM nor 32 raw/base64/hex bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: Path, key_name: str = "engine.bundle_public_key") -> Ed25519PublicKey:
    """Read an ed25519 public key file; ``ConfigError`` naming ``key_name`` when unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key_name}: cannot read {path}: {exc}") from exc
    try:
        return parse_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{key_name}: {path}: {exc}") from exc


def verify_manifest(manifest: bytes, signature: bytes | None, key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``signature`` is a valid ed25519 signature of ``manifest``."""
    if signature is None:
        raise SignatureError("bundle.sig is missing but a public key is configured")
    raw = signature if len(signature) == 64 else decode_text(signature, 64)
    if raw is None:
        raise SignatureError(f"bundle.sig is not a 64-byte ed25519 signature (raw or base64); got {len(signature)} bytes")
    try:
        key.verify(raw, manifest)
    except InvalidSignature as exc:
        raise SignatureError("bundle.sig does not match bundle.json (tampered, or signed with another key)") from exc


def verify_bundle_dir(root: Path, key: Ed25519PublicKey) -> bytes:
    """Verify ``root/bundle.sig`` over ``root/bundle.json``; returns the verified manifest bytes.

    Raises ``BundleError`` (missing files, bad or absent signature) so a load or reload fails
    the same way as for a checksum mismatch.
    """
    try:
        manifest = (Path(root) / MANIFEST).read_bytes()
    except OSError as exc:
        raise BundleError(f"{root}: cannot read {MANIFEST}: {exc}") from exc
    sig_path = Path(root) / SIGNATURE
    signature = sig_path.read_bytes() if sig_path.is_file() else None
    try:
        verify_manifest(manifest, signature, key)
    except SignatureError as exc:
        raise BundleError(f"{root}: {exc}") from exc
    return manifest


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The raw 64-byte signature (publishing side; also used by the tests)."""
    return key.sign(manifest)


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
