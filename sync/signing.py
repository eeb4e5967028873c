"""Ed25519 signatures over a bundle's ``bundle.json`` bytes (``cryptography``).

``bundle.sig`` holds the 64-byte signature, raw or as base64 text. A public key file holds the
key as PEM (``-----BEGIN PUBLIC KEY-----``), as 32 raw bytes, or as base64 / hex text of those
32 bytes. The manifest names every model file with its sha256, so a valid signature over it
covers the ONNX files too (their checksums are verified by ``service.bundle.load_bundle``), and
the training checkpoints of ``lineage.weights`` through theirs: a signed bundle whose
checkpoint entries carry no sha256 is refused (``check_weights_vouched``), at publication,
pull and adopt.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def unvouched_weights(manifest: Any) -> list[str]:
    """The ``lineage.weights`` entries (``role (file)``) of a parsed bundle.json that name a
    checkpoint without a sha256 (64 lower-case hex digits): a signature over bundle.json covers
    the ONNX files through their sha256, and a checkpoint only through its own. The pull
    installed such a file unchecked under a valid signature, and ``annotator train --init``
    unpickles it (a ``.pt`` file is a pickle: code). Entries that name no file are not
    downloaded (``sync.registry``): not listed here. ``annotator train`` writes every sha256."""
    lineage = manifest.get("lineage") if isinstance(manifest, dict) else None
    weights = lineage.get("weights") if isinstance(lineage, dict) else None
    out = []
    for role, entry in sorted(weights.items()) if isinstance(weights, dict) else ():
        if isinstance(entry, dict) and entry.get("file") and not (
                isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            out.append(f"{role} ({entry['file']})")
    return out


def check_weights_vouched(manifest: Any) -> None:
    """``SignatureError`` when ``unvouched_weights`` finds any, saying what to do."""
    bad = unvouched_weights(manifest)
    if bad:
        raise SignatureError(f"lineage.weights names checkpoints without a sha256 (64 lower-case hex digits), which "
                             f"the signature over bundle.json cannot vouch for: {', '.join(bad)}; give each its "
                             "sha256 (annotator train writes them) or leave the entry out")
