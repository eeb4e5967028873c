"""Publish a bundle to the model registry, where the sync agent's model pull finds it.

The registry layout is ``sync.registry``'s: ``bundles/<id>/bundle.json`` + the ONNX files it
names (+ ``bundle.sig``), in a folder or under an S3 prefix. Publishing also carries the
ultralytics checkpoints named in ``lineage.weights`` (``weights/<role>.pt``), so a bundle
pulled onto a box can be trained on again (``annotator train --init current``).

Order matters because a bundle is listed as soon as its ``bundle.json`` exists: the model
files, the checkpoints and ``bundle.sig`` go up first, ``bundle.json`` last. A reader never
sees a manifest whose files are not there yet. For the same reason an id published already with
another ``bundle.json`` is refused (``PermanentError``) before anything is written: its new
model files would sit beside the old manifest until the new one lands, and a reader then would
refuse the bundle for failed checksums, for good; and an id names one bundle on every box.

``open_registry("/srv/registry")`` or ``open_registry("s3://bucket/prefix")`` gives the
object store; S3 credentials come from boto3's standard chain, the endpoint from
``endpoint_url`` or boto3's own ``AWS_ENDPOINT_URL``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.bundle import load_bundle, plain_name_problem

from .errors import ObjectNotFound, PermanentError, SyncConfigError
from .objectstore import LocalFolderStore, ObjectStore, sha256_of
from .registry import BUNDLES, MANIFEST, SIGNATURE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """What was published: the bundle id, the keys written (manifest last) and the store."""

    bundle_id: str
    keys: tuple[str, ...]
    signed: bool
    registry: str


def open_registry(spec: str | Path, endpoint_url: str | None = None, region: str | None = None,
                  setting: str | None = None) -> ObjectStore:
    """The registry's object store for a folder path or an ``s3://bucket[/prefix]`` address;
    ``setting``: where the address was given, named when its bucket does not exist."""
    text = str(spec)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise SyncConfigError(f"registry: expected s3://bucket[/prefix], got {text!r}")
        from .s3store import S3Store

        return S3Store(bucket, prefix.strip("/"), endpoint_url=endpoint_url, region=region,
                       setting=setting or f"the registry address {text}")
    if "://" in text:
        raise SyncConfigError(f"registry: expected a folder or s3://bucket/prefix, got {text!r}")
    return LocalFolderStore(Path(text))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file (unencrypted); ``SyncConfigError`` when unusable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SyncConfigError(f"sign key {path}: cannot read an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SyncConfigError(f"sign key {path}: a {type(key).__name__}, expected an ed25519 key")
    return key


def bundle_files(bundle_dir: Path) -> list[str]:
    """Relative paths to publish besides bundle.json and bundle.sig: the model files, then the
    checkpoints of ``lineage.weights`` that exist (each checked against its sha256). A
    checkpoint's name is held to the pull's rule (``weights/`` and a plain file name): a
    ``weights/a\\b.pt`` stopped the publication halfway with the object store's ValueError."""
    bundle = load_bundle(bundle_dir)  # verifies checksums and ONNX layouts: never publish a broken bundle
    files = sorted(m.file for m in bundle.models.values())
    for role, entry in sorted(dict(bundle.lineage.get("weights") or {}).items()):
        rel = str(entry.get("file", ""))
        path = Path(bundle_dir) / rel
        if not rel.startswith("weights/") or plain_name_problem(rel[len("weights/"):]) or not path.is_file():
            log.warning("bundle %s: weights of %s (%r) missing; published without them", bundle.id, role, rel)
            continue
        if entry.get("sha256") and sha256_of(path) != entry["sha256"]:
            raise PermanentError(f"bundle {bundle.id}: {rel} does not match the sha256 in lineage.weights")
        files.append(rel)
    return files


def publish_bundle(bundle_dir: Path, store: ObjectStore, sign_key: Path | None = None) -> PublishResult:
    """Copy the bundle at ``bundle_dir`` to ``bundles/<id>/`` in ``store`` (module doc for the order).

    With ``sign_key`` (ed25519 private key, PEM) the signature over bundle.json's bytes is
    written to ``bundle.sig`` in the folder and in the registry. Re-publishing the same bundle
    rewrites the same objects; another bundle under a published id is refused (module doc).
    """
    from .signing import SignatureError, check_weights_vouched, sign_manifest

    bundle_dir = Path(bundle_dir)
    manifest = (bundle_dir / MANIFEST).read_bytes()
    bundle_id = str(json.loads(manifest)["id"])
    files = bundle_files(bundle_dir)
    if sign_key is not None:  # a signature must vouch for all it carries: every box would refuse it
        try:
            check_weights_vouched(json.loads(manifest))
        except SignatureError as exc:
            raise PermanentError(f"publish bundle {bundle_id} signed: {exc}") from exc
    prefix = f"{BUNDLES}{bundle_id}/"
    try:
        published = store.get(prefix + MANIFEST)
    except ObjectNotFound:
        published = None
    if published is not None and published != manifest:
        raise PermanentError(f"bundle id {bundle_id} is published already with other contents (its bundle.json "
                             f"differs); give the bundle a new id (the registry and the boxes keep the one they have)")
    keys: list[str] = []

    def put(rel: str, data: bytes | Path, **kw: str) -> None:
        try:
            store.put(prefix + rel, data, **kw)
        except OSError as exc:  # a full or read-only registry folder: errno 28 alone names no path
            raise PermanentError(f"publish bundle {bundle_id}: writing {prefix + rel} in {store!r} failed: {exc}; "
                                 f"not listed ({MANIFEST} goes last): free space or fix the registry, then publish "
                                 "again") from exc
        keys.append(prefix + rel)

    for rel in files:
        put(rel, bundle_dir / rel, sha256=sha256_of(bundle_dir / rel))
    signed = sign_key is not None
    if sign_key is not None:
        signature = sign_manifest(manifest, load_private_key(sign_key))
        (bundle_dir / SIGNATURE).write_bytes(signature)
        put(SIGNATURE, signature)
    elif store.head(prefix + SIGNATURE) is not None:
        store.delete(prefix + SIGNATURE)  # a stale signature of an earlier publication would be refused
    put(MANIFEST, manifest, content_type="application/json")
    log.info("published bundle %s to %r (%d objects%s)", bundle_id, store, len(keys), ", signed" if signed else "")
    return PublishResult(bundle_id, tuple(keys), signed, repr(store))
