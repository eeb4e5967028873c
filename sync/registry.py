"""The model registry: bundles published under one prefix of an object store (or a folder).

Layout (the same in a folder, ``LocalFolderStore(root)``, and in a bucket, ``S3Store``)::

    bundles/<bundle_id>/bundle.json     the manifest (``service.bundle``)
    bundles/<bundle_id>/<model>.onnx    the files it names
    bundles/<bundle_id>/bundle.sig      optional: ed25519 signature over bundle.json's bytes
    bundles/<bundle_id>/weights/<role>.pt   optional: training checkpoints (``lineage.weights``)

``BundleRegistry`` lists the published bundles, orders them (``created``, then ``id``) and
downloads one into a local folder: only ``bundle.json``, ``bundle.sig`` and the files the
manifest names travel; the folder is filled under a temporary name (``.<id>.partial``) and
renamed into place, so a half-downloaded bundle is never looked at (``sync.models`` fsyncs a
bundle's files once, before it goes live: ``ModelSlots.install``). A kill -9 mid-download leaves the
temporary folder behind: ``remove_partials`` clears them before a pull. Checksums, layouts and the signature are checked
by the caller (``sync.models``), not here. Problems of the bundle itself raise
``BundleContentError`` (the caller refuses that bundle); the store's own errors (credentials,
bucket, outages) pass through unchanged, so that they never refuse a good bundle.

A publication killed before its ``bundle.json`` (``sync.publish`` writes it last) leaves a
folder of model files that nothing lists or pulls, for good, unless the same bundle is
published again (which completes it). ``orphans`` finds such folders whose newest object is a
day old (younger: maybe a publication running now) and ``remove_orphan`` deletes one, after
listing it again (``annotator models clean-registry``: a dry run unless ``--apply``). A
publication killed while a file went up in parts (S3) also leaves a multipart upload, which
no listing of objects shows and the bucket bills for ever: ``abandoned_uploads`` finds those
in folders where nothing was written for as long, ``abort_upload`` aborts one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import BundleContentError, ObjectNotFound, RetryableError
from .objectstore import ObjectStore, TimedListing

log = logging.getLogger(__name__)

BUNDLES = "bundles/"
MANIFEST, SIGNATURE = "bundle.json", "bundle.sig"
# An ONNX model in one file (external data is refused) cannot pass protobuf's 2 GiB; a larger
# object is not a model, and its download held it in memory twice (a sparse 512 MiB file took
# the agent from 29 MB to 1 GB): refused from its size before it is fetched.
MAX_MODEL_BYTES = 2 << 30
PARTIAL = ".partial"  # suffix of a download in progress: .<bundle id>.partial next to its destination


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (a write since), or gone


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{PARTIAL}")


def remove_partials(folder: Path) -> list[str]:
    """Remove the ``.<id>.partial`` folders under ``folder`` that a killed download left
    (``download`` removes its own on any error, but not through kill -9 or a power loss, and a
    bundle that is never downloaded again would keep its half copy for good). Only call it
    while no download runs into ``folder``. Returns the names removed."""
    removed = []
    for path in sorted(Path(folder).glob(f".*{PARTIAL}")):
        if path.is_dir() and not path.is_symlink() and len(path.name) > 1 + len(PARTIAL):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("removed %d interrupted downloads under %s: %s", len(removed), folder, ", ".join(removed))
    return removed


ORPHAN_MIN_AGE_S = 86400.0  # a publication runs minutes: a day-old folder without bundle.json was cut short


@dataclass(frozen=True)
class Orphan:
    """A folder under ``bundles/`` that no ``bundle.json`` names: what a publication killed
    before its manifest left (``sync.publish`` writes ``bundle.json`` last)."""

    bundle_id: str
    keys: tuple[str, ...]
    size: int
    newest_age_s: float  # seconds since its newest object was written (or a write in progress there began)


@dataclass(frozen=True)
class AbandonedUpload:
    """A multipart upload under ``bundles/<bundle_id>/`` that a killed publication left: S3
    keeps (and bills) its parts for ever unless it is aborted or a lifecycle rule does it.
    ``age_s``: seconds since anything was written in its folder (the upload's last part, the
    folder's objects, its other uploads)."""

    bundle_id: str
    key: str
    upload_id: str
    size: int
    age_s: float


def _timed_listing(store: ObjectStore, prefix: str) -> TimedListing:
    """The store's ``list_with_times``: the objects under ``prefix`` with their times, and the
    store's clock to judge them by. A store whose objects have no time is cleaned by hand."""
    listing = getattr(store, "list_with_times", None)
    if listing is None:
        raise BundleContentError(f"{store!r}: cannot tell the age of its objects; clean it by hand")
    return listing(prefix)


def _plain_name(name: str) -> bool:
    """A file name that stays inside the bundle's folder in every store: the one rule of bundle
    ids and file names (``service.bundle.plain_name_problem``)."""
    from service.bundle import plain_name_problem

    return plain_name_problem(name) is None


@dataclass(frozen=True)
class RegistryEntry:
    """A published bundle as the registry lists it. ``manifest`` is bundle.json's parsed data
    (None when unreadable; ``problem`` then says why)."""

    bundle_id: str
    created: str
    manifest: dict[str, Any] | None
    problem: str | None = None

    @property
    def order(self) -> tuple[str, str]:
        """Sort key: newer bundles sort later."""
        return (self.created, self.bundle_id)


class BundleRegistry:
    """Read-only view of ``bundles/`` in ``store``.

    ``progress`` (the sync agent's ``beat``) is called per MiB and after each file ``download``
    fetched: a bundle, or one model file, over a weak LTE link outlasts the systemd watchdog's
    limit, and a watchdog that killed the agent mid-download would start the download from
    scratch at every restart.
    """

    def __init__(self, store: ObjectStore, progress: Callable[[], None] | None = None) -> None:
        self.store = store
        self.progress = progress
        self._said: set[str] = set()  # keys of objects under a folder no bundle id can name, said once

    def __repr__(self) -> str:
        return f"BundleRegistry({self.store!r})"

    def bundle_ids(self) -> list[str]:
        """Ids of every folder under ``bundles/`` that holds a ``bundle.json``."""
        ids = set()
        for key in self.store.list(BUNDLES):
            parts = key[len(BUNDLES):].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and self._plain_id(parts[0], key):
                ids.add(parts[0])
        return sorted(ids)

    def _plain_id(self, bundle_id: str, key: str) -> bool:
        """Whether ``bundle_id`` can name a folder (``check_bundle_id``); else said once per key
        and left out: reading ``bundles/../bundle.json`` raised at every pull, and deleting
        under it ended ``clean-registry``."""
        from service.bundle import check_bundle_id
        from service.errors import BundleError

        try:
            check_bundle_id(bundle_id, key)
        except BundleError as exc:
            if key not in self._said:
                self._said.add(key)
                log.warning("%s; left out (remove it from %r)", exc, self.store)
            return False
        return True

    def entries(self) -> list[RegistryEntry]:
        """Every published bundle, oldest first. An unreadable manifest is listed with its problem
        (``created`` taken as the id, so it still has a place in the order)."""
        out = []
        for bid in self.bundle_ids():
            try:
                raw = self.manifest_bytes(bid)
            except ObjectNotFound:  # withdrawn between the listing and now: not a bundle any more
                log.info("bundle %s was withdrawn from %r while it was being listed", bid, self.store)
                continue
            try:
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                out.append(RegistryEntry(bid, str(data.get("created", "")), data))
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # Recursion: "[[[[..." 100k deep
                out.append(RegistryEntry(bid, "", None, f"bundle.json is not valid JSON: {str(exc)[:200]}"))
        return sorted(out, key=lambda e: e.order)

    def orphans(self, min_age_s: float = ORPHAN_MIN_AGE_S, now: float | None = None) -> list[Orphan]:
        """The folders under ``bundles/`` without a ``bundle.json`` whose newest object is at
        least ``min_age_s`` old: a publication killed midway (nothing lists them, nothing pulls
        them, nothing removed them). A younger one may be a publication running now: left.
        Ages are judged by the store's clock (the one that stamped the objects: a bucket's
        ``Date``), not this box's; ``now`` overrides it. A write in progress in the folder (a
        model file still going up: not listed as an object) counts from when it began."""
        listing = _timed_listing(self.store, BUNDLES)
        now = listing.now if now is None else now
        folders: dict[str, dict[str, tuple[float, int]]] = {}
        for key, stamp in listing.objects.items():
            bid, _, rest = key[len(BUNDLES):].partition("/")
            if bid and rest:
                folders.setdefault(bid, {})[key] = stamp
        writing: dict[str, float] = {}
        for key, began in listing.writing.items():
            bid = key[len(BUNDLES):].partition("/")[0]
            writing[bid] = max(began, writing.get(bid, began))
        out = []
        for bid, objects in sorted(folders.items()):
            if not self._plain_id(bid, min(objects)):
                continue
            if any(k.endswith(f"/{MANIFEST}") for k in objects):
                continue  # a bundle (or a registry nested here, the store opened a level too high): never an orphan
            age = now - max([t for t, _ in objects.values()] + [writing.get(bid, -float("inf"))])
            if age >= min_age_s:
                out.append(Orphan(bid, tuple(sorted(objects)), sum(n for _, n in objects.values()), age))
        return out

    def abandoned_uploads(self, min_age_s: float = ORPHAN_MIN_AGE_S, now: float | None = None) -> list[AbandonedUpload]:
        """The multipart uploads under ``bundles/`` (never elsewhere under the store's prefix: an
        uploader may share it) in folders where nothing was written for ``min_age_s``: the
        upload's own last part, and every object and upload in its folder, that old (a
        publication running now writes there; a killed one's upload beside it waits for its
        end). Aged by the store's clock, as ``orphans``; a store that cannot abort uploads (a
        folder: its ``.tmp`` left-overs are removed by ``check``) lists none."""
        if getattr(self.store, "abort_upload", None) is None:
            return []
        listing = _timed_listing(self.store, BUNDLES)
        now = listing.now if now is None else now
        newest: dict[str, float] = {}
        for key, when in [*((k, t) for k, (t, _) in listing.objects.items()),
                          *((u.key, u.last) for u in listing.uploads)]:
            bid = key[len(BUNDLES):].partition("/")[0]
            newest[bid] = max(when, newest.get(bid, when))
        out = []
        for up in sorted(listing.uploads, key=lambda u: (u.key, u.upload_id)):
            bid, _, rest = up.key[len(BUNDLES):].partition("/")
            if not rest or not self._plain_id(bid, up.key):
                continue
            age = now - newest[bid]
            if age >= min_age_s:
                out.append(AbandonedUpload(bid, up.key, up.upload_id, up.size, age))
        return out

    def abort_upload(self, upload: AbandonedUpload, min_age_s: float = ORPHAN_MIN_AGE_S) -> bool:
        """Abort ``upload`` unless its folder changed since it was found (an object written, or an
        upload begun or added to, within ``min_age_s``: a publication of that id running now),
        or it is gone; False then, nothing aborted. Ages by the store's clock."""
        listing = _timed_listing(self.store, f"{BUNDLES}{upload.bundle_id}/")
        times = [*(t for t, _ in listing.objects.values()), *(u.last for u in listing.uploads)]
        if not any(u.upload_id == upload.upload_id for u in listing.uploads) or any(
                listing.now - t < min_age_s for t in times):
            log.warning("upload of %s changed or ended since it was found (a publication running?); left",
                        upload.key)
            return False
        self.store.abort_upload(upload.key, upload.upload_id)  # type: ignore[attr-defined]
        log.info("aborted the multipart upload of %s in %r that a killed publication left (%d bytes in parts)",
                 upload.key, self.store, upload.size)
        return True

    def remove_orphan(self, orphan: Orphan, min_age_s: float = ORPHAN_MIN_AGE_S) -> bool:
        """Delete an orphan's objects, unless its folder changed since it was found (a
        ``bundle.json``, or an object written, or a write begun, within ``min_age_s``: a publication
        of that id again, or one still running); False then, nothing deleted. Ages by the store's
        clock, as in ``orphans``."""
        listing = _timed_listing(self.store, f"{BUNDLES}{orphan.bundle_id}/")
        now, again = listing.now, listing.objects
        if any(k.endswith(f"/{MANIFEST}") for k in again) or any(
                now - t < min_age_s for t in [*(t for t, _ in again.values()), *listing.writing.values()]):
            log.warning("bundle folder %s changed since it was found (published again?); left", orphan.bundle_id)
            return False
        for key in sorted(again):
            self.store.delete(key)
        from .objectstore import LocalFolderStore

        if isinstance(self.store, LocalFolderStore):  # a folder store keeps the emptied folders
            folder = self.store.base / BUNDLES / orphan.bundle_id
            for tmp in folder.rglob(".*.tmp"):  # a write the kill cut short: not listed as an object
                try:
                    if now - tmp.stat().st_mtime >= min_age_s:
                        tmp.unlink()
                except OSError:
                    pass
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
                _rmdir(sub)
            _rmdir(folder)
        log.info("removed bundle folder %s of %r (%d objects, %d bytes, no bundle.json)", orphan.bundle_id,
                 self.store, len(again), sum(n for _, n in again.values()))
        return True

    def manifest_bytes(self, bundle_id: str) -> bytes:
        return self.store.get(f"{BUNDLES}{bundle_id}/{MANIFEST}")

    def _progress(self) -> None:
        if self.progress is not None:
            self.progress()

    def _download_weights(self, bundle_id: str, manifest: Any, dest: Path) -> None:
        """The training checkpoints named in ``lineage.weights`` (``weights/<role>.pt``), when
        published: a bundle pulled onto the box can be trained on again. Optional: a missing or
        mismatching checkpoint is skipped with a warning (the daemon needs only the ONNX files).
        A ``lineage`` that is not a table is a malformed manifest (``BundleContentError``; the
        bundle's loader could not read it either), not a crash of the pull."""
        lineage = manifest.get("lineage") if isinstance(manifest, dict) else None
        if lineage is not None and not isinstance(lineage, dict):
            raise BundleContentError(f"bundle {bundle_id}: bundle.json is malformed: lineage is a "
                                     f"{type(lineage).__name__}, expected a table")
        weights = (lineage or {}).get("weights")
        if weights is not None and not isinstance(weights, dict):
            log.warning("bundle %s: lineage.weights is a %s, not a table; pulled without checkpoints",
                        bundle_id, type(weights).__name__)
            return
        for role, entry in sorted(dict(weights or {}).items()):
            rel = str(entry.get("file", "")) if isinstance(entry, dict) else ""
            name = rel[len("weights/"):]
            if not rel.startswith("weights/") or not _plain_name(name):
                log.warning("bundle %s: weights of %s at %r is not weights/<file>; skipped", bundle_id, role, rel)
                continue
            try:
                data = self.store.get(f"{BUNDLES}{bundle_id}/{rel}", progress=self.progress)
            except ObjectNotFound:
                log.info("bundle %s: %s not published; pulled without it", bundle_id, rel)
                continue
            self._progress()
            if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
                log.warning("bundle %s: %s does not match its sha256 in lineage.weights; skipped", bundle_id, rel)
                continue
            (dest / "weights").mkdir(exist_ok=True)
            (dest / rel).write_bytes(data)

    def download(self, bundle_id: str, dest: Path) -> Path:
        """Copy the bundle into the folder ``dest`` (replaced if present) and return it.

        Raises ``BundleContentError`` when bundle.json is malformed, names a file the registry
        lacks or a file name that is not a plain name; ``RetryableError`` when bundle.json itself
        is gone (the bundle was withdrawn after the listing: the next listing no longer has it,
        and it is not refused, in case it comes back).
        The store's errors (``RetryableError``, and ``PermanentError`` for credentials or a
        missing bucket) pass through: they are not the bundle's fault.
        """
        dest = Path(dest)
        tmp = _partial(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            try:
                manifest = self.manifest_bytes(bundle_id)
            except ObjectNotFound as exc:
                raise RetryableError(f"bundle {bundle_id}: bundle.json vanished from the registry "
                                     "while it was being downloaded") from exc
            (tmp / MANIFEST).write_bytes(manifest)
            self._progress()
            try:
                data = json.loads(manifest)
                files = sorted({str(m["file"]) for m in dict(data.get("models") or {}).values() if m})
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                raise BundleContentError(f"bundle {bundle_id}: bundle.json is malformed: {str(exc)[:200]}") from exc
            for name in files:
                if not _plain_name(name) or name in (MANIFEST, SIGNATURE):
                    raise BundleContentError(f"bundle {bundle_id}: model file name {name!r} is not a plain file name")
                info = self.store.head(f"{BUNDLES}{bundle_id}/{name}")
                if info is not None and info.size > MAX_MODEL_BYTES:
                    raise BundleContentError(f"bundle {bundle_id}: {name} is {info.size} bytes, more than an ONNX "
                                             f"model in one file can be ({MAX_MODEL_BYTES})")
                try:
                    (tmp / name).write_bytes(self.store.get(f"{BUNDLES}{bundle_id}/{name}", progress=self.progress))
                except ObjectNotFound as exc:
                    if self.store.head(f"{BUNDLES}{bundle_id}/{MANIFEST}") is None:
                        raise RetryableError(f"bundle {bundle_id} was withdrawn from the registry while it "
                                             "was being downloaded") from exc
                    raise BundleContentError(f"bundle {bundle_id}: {name} is named in bundle.json but missing "
                                             "from the registry") from exc
                self._progress()
            try:
                (tmp / SIGNATURE).write_bytes(self.store.get(f"{BUNDLES}{bundle_id}/{SIGNATURE}"))
            except ObjectNotFound:
                pass
            self._download_weights(bundle_id, data, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("downloaded bundle %s from %r to %s", bundle_id, self.store, dest)
        return dest
