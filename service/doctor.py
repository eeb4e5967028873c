"""``annotator doctor``: check that this machine can run the appliance, with advice per problem.

Each check returns a ``Check`` (name, level OK/WARN/FAIL/SKIP, what was found, one line of
advice when it is not OK). ``run_checks(path, env)`` runs them in order:

    config     the TOML file loads and validates (service.config)
    sync       only with a [sync] table: the sync agent's own validators accept it (what
               ``annotator sync`` checks before it starts; a refusal there is a restart loop)
    folders    drop folder, store root, sidecar folder exist (or can be created) and are writable
    disk       free space on the store's file system against store.min_free_mb, the days it
               lasts at the last 24 hours' intake, and whether retention is on
    inotify watches  the drop folder's folders (one watch each) against the user's inotify limit
    bundle     engine.bundle loads and verifies (checksums, ONNX layouts)
    providers  onnxruntime version, execution providers available / requested, CUDA / TensorRT
    s3         [sync.target] kind = "s3": HeadBucket with a short timeout (boto3's credential chain)
    review     [sync.review] kind = "labelstudio": GET <url>/health
    clock      the system year is plausible; a fresh file's mtime agrees with the system clock

``SKIP`` (nothing configured to check) counts as passing; ``exit_code`` is 1 when any check
FAILs, else 0. Nothing here changes the machine beyond a temporary file per folder.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
NETWORK_TIMEOUT = 3.0  # seconds per network probe
CLOCK_TOLERANCE = 5.0  # seconds between a file's mtime and the system clock
MIN_YEAR = 2024


@dataclass(frozen=True)
class Check:
    """One line of the report; ``advice`` is set when ``level`` is WARN or FAIL."""

    name: str
    level: str
    detail: str
    advice: str = ""


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that can be seen to exist (os.path.exists: a
    path under a folder this user may not search counts as missing, it does not raise)."""
    p = path.absolute()
    while not os.path.exists(p) and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> str | None:
    """None when a file can be created (and removed) in ``folder``, else the error text."""
    try:
        fd, name = tempfile.mkstemp(prefix=".annotator-doctor-", dir=folder)
        os.close(fd)
        os.unlink(name)
        return None
    except OSError as exc:
        return exc.strerror or str(exc)


# -- config ---------------------------------------------------------------------------------
def load_for_doctor(path: Path | None, env: Mapping[str, str]) -> tuple[Any, dict[str, Any], Check]:
    """(Config or None, the raw ``[sync]`` table, the config check)."""
    from .config import ENV_PREFIX, load_config
    from .errors import ConfigError

    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            return None, {}, Check("config", FAIL, f"config file {path} cannot be read as TOML: {exc}",
                                   "give --config the appliance's TOML file (see deploy/annotator.example.toml)")
    sync: dict[str, Any] = raw["sync"] if isinstance(raw.get("sync"), dict) else {}
    where = str(path) if path else "defaults and environment"
    try:
        # [sync] is one of config.PASSTHROUGH: kept raw for the sync agent, the rest validated.
        cfg = load_config(path, env)
    except ConfigError as exc:
        return None, sync, Check("config", FAIL, str(exc), "fix that key in the file (or its ANNOTATOR_* variable)")
    return cfg, sync, Check("config", OK, f"{where}: valid")


def check_sync(path: Path | None, env: Mapping[str, str]) -> Check:
    """``[sync]`` validated by the sync agent's own code, as ``sync.agent.build_agent`` does
    before it opens anything: the ``[sync]`` and ``[sync.target]`` keys, then
    ``sync.agent.validated_settings``. Service only checks that ``[sync]`` is a table; without this, a typo or
    a missing token passed here and ``annotator sync`` exited 2 at every start under systemd."""
    try:
        from sync.agent import bundle_warning, registry_warning, validated_settings
        from sync.config import journal_appliance_id, load_sync_config
        from sync.errors import SyncError
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("sync"):
            raise
        return Check("sync", WARN, "a [sync] table, but the sync agent is not installed",
                     "install the whole edge-annotator package, or remove [sync] from the file")
    try:
        cfg = load_sync_config(path, env)
        review, pull, training = validated_settings(cfg, env)
    except SyncError as exc:
        advice = ("set ANNOTATOR_LABEL_STUDIO_TOKEN in /etc/annotator/annotator.env (the units read it; run doctor "
                  "with it set too)" if ".token" in str(exc) else "fix that key in the file")
        return Check("sync", FAIL, str(exc), advice + ": until then annotator sync refuses to start")
    warning = registry_warning(cfg, pull, training)
    if warning is not None:
        return Check("sync", WARN, warning, "fix [sync.models.registry] root (and prefix) if it is mistyped; else it "
                                            "is made by the first publication (annotator train --publish)")
    warning = bundle_warning(cfg, pull)
    if warning is not None:
        return Check("sync", WARN, warning, "point engine.bundle at <models root>/current (annotator models adopt "
                                            "installs the bundle in use there first)")
    # A store restored under another id (a config from another box or a template): the reviews
    # of what the journal sent under the old id are collected under that id only, so they would
    # never merge. The warning ends with the first batch sent under the new id (a choice made).
    before = journal_appliance_id(cfg.store_root)
    if before not in (None, cfg.appliance_id):
        return Check("sync", WARN, f"appliance_id {cfg.appliance_id!r}, but this store's sync journal uploaded under "
                                   f"{before!r}: the reviews of what it sent under {before!r} are not collected",
                     f"set appliance_id = \"{before}\" in [sync] to collect them; if {cfg.appliance_id!r} is meant, "
                     f"this warning ends with its first upload")
    return Check("sync", OK, f"appliance {cfg.appliance_id}: target {cfg.target.kind}, review {review.kind}, "
                             f"store {cfg.store_root}")


# -- file system ----------------------------------------------------------------------------
def check_folders(cfg: Any) -> list[Check]:
    """The drop folder must exist (capture tools write there) unless the daemon makes it at a first
    start (``dropfolder.missing_drop_folder``: a WARN, as the daemon starts; a FAIL where the
    daemon refuses to start); store and sidecars may be created."""
    out = []
    folders: list[tuple[str, Path | None, bool]] = [
        ("drop.folder", cfg.drop.folder, True), ("store.root", cfg.store.root, False),
        ("outputs.sidecar_dir", cfg.outputs.sidecar_dir, False)]
    for key, folder, must_exist in folders:
        name = f"folder {key}"
        if folder is None:
            out.append(Check(name, SKIP, "not set"))
            continue
        folder = Path(folder)
        try:
            folder.stat()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a folder above it that this user may not search
            out.append(Check(name, FAIL, f"{folder}: cannot look at it: {exc.strerror or exc}",
                             f"give the service user access to {folder} and the folders above it "
                             f"(namei -l {folder}), or change {key}"))
            continue
        if folder.is_dir():
            err = _writable(folder)
            out.append(Check(name, OK, f"{folder} writable") if err is None else
                       Check(name, FAIL, f"{folder}: cannot write: {err}",
                             f"give the service user write access: chown -R annotator: {folder}"))
            continue
        if folder.exists():
            out.append(Check(name, FAIL, f"{folder} is not a folder", f"remove or rename {folder}, or change {key}"))
            continue
        parent = _existing_ancestor(folder)
        if must_exist:
            out.append(_missing_drop_folder(cfg, name, folder, parent))
        elif parent.is_dir() and _writable(parent) is None:
            out.append(Check(name, WARN, f"{folder} does not exist; will be created in {parent}",
                             f"create it now to be sure of its owner: install -d -o annotator {folder}"))
        else:
            out.append(Check(name, FAIL, f"{folder} does not exist and {parent} is not writable",
                             f"create it: install -d -o annotator {folder}, or point {key} elsewhere"))
    return out


def _missing_drop_folder(cfg: Any, name: str, folder: Path, parent: Path) -> Check:
    """What ``annotator serve`` will do with the missing drop folder ``folder`` (``parent``: the
    nearest folder above it that exists): make it (WARN: check the path) or refuse to start (FAIL)."""
    from .dropfolder import missing_drop_folder

    source = cfg.source_of("drop.folder")
    create = f"install -d -m 2770 -o annotator -g annotator {folder}"
    refusal = missing_drop_folder(folder, Path(cfg.store.root))
    if refusal is not None:
        return Check(name, FAIL, f"{refusal}: annotator serve refuses to start",
                     f"fix drop.folder ({source}), or if the folder is meant to be new, create it: {create}")
    if _writable(parent) is not None:
        return Check(name, FAIL, f"{folder} does not exist and {parent} is not writable: annotator serve cannot make it",
                     f"create it: {create}")
    return Check(name, WARN, f"{folder} does not exist; annotator serve makes it (empty) at its first start",
                 f"check that the capture tools write there ({source}; a typo makes a folder nothing writes into), "
                 f"then create it with the owner they need: {create}")


WATCH_SHARE_WARN = 0.5  # of the user's inotify watches, for the drop folder's folders alone


def check_watches(cfg: Any) -> Check:
    """The drop folder's folders against the user's inotify watch limit: each is one watch of
    the daemon's (``processed/`` and ``quarantine/`` are not watched). Past the limit the daemon
    finds new files by its full walks only (every 30-600 s), and other programs of the user
    (editors, IDEs, other watchers) share the same limit."""
    from .dropfolder import inotify_watch_limit, watched_folders

    folder = getattr(getattr(cfg, "drop", None), "folder", None)
    if folder is None or not Path(folder).is_dir():
        return Check("inotify watches", SKIP, "no drop folder")
    limit = inotify_watch_limit()
    if limit is None:
        return Check("inotify watches", SKIP, "no inotify limit to read (not Linux)")
    folders = watched_folders(Path(folder))
    detail = f"{folders} folders to watch in {folder}, fs.inotify.max_user_watches {limit}"
    if folders <= WATCH_SHARE_WARN * limit:
        return Check("inotify watches", OK, detail)
    return Check("inotify watches", WARN if folders < limit else FAIL, detail,
                 "raise the limit (sysctl fs.inotify.max_user_watches=524288, kept in /etc/sysctl.d/), or remove the "
                 "empty recording folders (drop.remove_empty_hours); past it new files are found by the full walks "
                 "only, every 30-600 s")


RUNWAY_WARN_DAYS = 7.0


def last_day_intake(store_root: Path, now: float | None = None) -> tuple[int, int] | None:
    """(images, bytes) the store took in the last 24 hours, or None without a store. Read-only:
    the database opened with ``mode=ro`` (a running daemon is not disturbed), sizes by stat."""
    import sqlite3

    from .store import image_file

    db_path = store_root / "store.sqlite3"
    if not os.path.isfile(db_path):  # not Path.is_file: it raises PermissionError (the folders check says so)
        return None
    since = (time.time() if now is None else now) - 86400.0
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
        try:
            ids = [r[0] for r in db.execute("SELECT image_id FROM images WHERE received_at >= ?", (since,))]
        finally:
            db.close()
    except sqlite3.Error as exc:
        log.debug("intake of the last day not read from %s: %s", db_path, exc)
        return None
    size = 0
    for image_id in ids:
        try:
            size += image_file(store_root, image_id).stat().st_size
        except OSError:
            pass
    return len(ids), size


def check_disk(cfg: Any) -> Check:
    """Free space against the floor, and how many days it lasts at the last day's intake (a
    box fills silently otherwise: ingest pauses at the floor and waits for a person)."""
    where = _existing_ancestor(Path(cfg.store.root))
    free = shutil.disk_usage(where).free
    floor = int(cfg.store.min_free_mb) * 1_000_000
    detail = f"{free / 1e9:.1f} GB free on {where}, floor {floor / 1e6:.0f} MB"
    keep = getattr(cfg, "retention", None)
    rules = [f"{name} after {days:g} days" for name, days in
             (("processed/ copies", getattr(keep, "processed_days", None)),
              ("auto-accepted images", getattr(keep, "auto_image_days", None)),
              ("quarantined files", getattr(keep, "quarantine_days", None))) if days is not None]
    hint = "" if rules else "; [retention] processed_days / auto_image_days let the daemon remove old copies"
    runway = None
    intake = last_day_intake(Path(cfg.store.root))
    if intake is not None and intake[1] > 0:
        per_day = intake[1]
        drop = getattr(cfg, "drop", None)
        if getattr(drop, "folder", None) is not None and getattr(drop, "processed_mode", "") in ("move", "keep") \
                and os.stat(_existing_ancestor(Path(drop.folder))).st_dev == os.stat(where).st_dev:
            per_day *= 2  # processed/ (move) or the drop folder itself (keep) holds a second copy on this disk
        runway = max(free - floor, 0) / per_day
        detail += f"; last 24 h: {intake[0]} images, {per_day / 1e9:.2f} GB/day, floor in {runway:.1f} days"
    detail += "; retention: " + (", ".join(rules) if rules else "off, nothing is ever removed")
    if free < floor:
        return Check("disk", FAIL, detail, "free disk space, or lower store.min_free_mb: ingest is paused below it" + hint)
    if runway is not None and runway < RUNWAY_WARN_DAYS:
        return Check("disk", WARN, detail, f"at this intake the floor is reached in under {RUNWAY_WARN_DAYS:g} days: "
                     "free space or add disk" + hint)
    if free < 2 * floor:
        return Check("disk", WARN, detail, "less than twice the floor left: free space soon" + hint)
    return Check("disk", OK, detail)


def check_clock(folder: Path, now: Callable[[], float] = time.time) -> Check:
    """The year is plausible, and a file written now carries (about) the system time."""
    t = now()
    year = dt.datetime.fromtimestamp(t, dt.timezone.utc).year
    if year < MIN_YEAR:
        return Check("clock", FAIL, f"system time is {dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%d}",
                     "set the clock: timedatectl set-ntp true (time stamps, TLS and S3 signatures depend on it)")
    where = _existing_ancestor(folder)
    try:
        with tempfile.NamedTemporaryFile(prefix=".annotator-clock-", dir=where) as f:
            f.write(b"x")
            f.flush()
            skew = os.fstat(f.fileno()).st_mtime - t
    except OSError:
        with tempfile.NamedTemporaryFile(prefix=".annotator-clock-") as f:
            skew = os.fstat(f.fileno()).st_mtime - t
    detail = f"{dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, file clock {skew:+.1f} s"
    if abs(skew) > CLOCK_TOLERANCE:
        return Check("clock", WARN, detail, f"file times on {where} differ from the system clock "
                                            "(network file system?): sync both to NTP")
    return Check("clock", OK, detail)


# -- models ---------------------------------------------------------------------------------
def check_bundle(cfg: Any) -> Check:
    from .bundle import load_bundle
    from .errors import BundleError

    from .errors import ConfigError
    from .signing import load_public_key, verify_bundle_dir

    if cfg.engine.bundle is None:
        return Check("bundle", FAIL, "engine.bundle is not set", "set engine.bundle to a bundle directory")
    key_path = cfg.engine.bundle_public_key
    where = Path(cfg.engine.bundle)
    if where.name == "current" and not where.exists():  # a models folder's link, before its first bundle
        return Check("bundle", FAIL, f"{where} does not exist: no bundle was installed in {where.parent} yet",
                     "install the first bundle: annotator models adopt BUNDLE_DIR --config F (the shipped demo "
                     "bundle, or one from annotator train / the registry); the sync agent pulls later ones")
    try:
        if key_path is not None:
            verify_bundle_dir(Path(cfg.engine.bundle), load_public_key(Path(key_path)))
        b = load_bundle(cfg.engine.bundle, verify=True)
    except ConfigError as exc:
        return Check("bundle", FAIL, str(exc), "point engine.bundle_public_key at the registry's ed25519 public key")
    except BundleError as exc:
        if "bundle.sig" in str(exc):
            return Check("bundle", FAIL, str(exc), "take the bundle and its bundle.sig from the registry that "
                         "engine.bundle_public_key belongs to")
        advice = ("the model file changed after the bundle was made: copy the bundle again from its source"
                  if "checksum" in str(exc) else
                  "point engine.bundle at a complete bundle directory (bundle.json + the ONNX files it names)")
        return Check("bundle", FAIL, str(exc), advice)
    signed = " (signature valid)" if key_path is not None else ""
    return Check("bundle", OK, f"{b.id}: {', '.join(sorted(b.models))} verified{signed}")


def check_providers(cfg: Any) -> Check:
    import onnxruntime as ort

    from .engine import select_providers
    from .errors import BundleError

    available = ort.get_available_providers()
    gpu = [name for name, p in (("CUDA", "CUDAExecutionProvider"), ("TensorRT", "TensorrtExecutionProvider"))
           if p in available]
    requested = list(cfg.engine.providers) or None
    detail = f"onnxruntime {ort.__version__}; GPU: {', '.join(gpu) or 'none (CPU only)'}"
    try:
        chosen = select_providers(requested)
    except BundleError as exc:
        return Check("providers", FAIL, f"{detail}; {exc}",
                     "clear engine.providers, or install onnxruntime-gpu as README.md's GPU section (or install.sh --gpu) does")
    missing = [p for p in requested or () if p not in available]
    if missing:
        return Check("providers", WARN, f"{detail}; using {', '.join(chosen)}",
                     f"{', '.join(missing)} not available: install onnxruntime-gpu and the CUDA libraries, "
                     "or remove them from engine.providers")
    active = _session_providers(cfg, chosen)
    if active is not None and active[0] != chosen[0]:
        return Check("providers", WARN, f"{detail}; {chosen[0]} is offered but a session of the bundle runs on "
                     f"{', '.join(active)}",
                     "TensorRT: install it or leave it out of engine.providers; CUDA: install the NVIDIA driver "
                     "and pip install 'onnxruntime-gpu[cuda,cudnn]' (CUDA and cuDNN of the wheel's major version)")
    return Check("providers", OK, f"{detail}; using {', '.join(active or chosen)}")


def _session_providers(cfg: Any, chosen: list[str]) -> list[str] | None:
    """The providers a real session of the bundle's smallest model gets, when a GPU one is
    chosen: onnxruntime offers a GPU provider whenever its library ships and falls back to the
    CPU only when a session is made. None: nothing to probe (CPU only, or no loadable bundle;
    the bundle check says why)."""
    from .bundle import load_bundle
    from .engine import GPU_PROVIDERS, open_session

    if chosen[0] not in GPU_PROVIDERS or cfg.engine.bundle is None:
        return None
    try:
        bundle = load_bundle(cfg.engine.bundle)
        path = min((bundle.model_path(r) for r in bundle.models), key=lambda p: p.stat().st_size)
        return list(open_session(str(path), chosen)[0].get_providers())
    except Exception:  # noqa: BLE001 - a bundle that does not load is the bundle check's finding
        return None


# -- remote services ------------------------------------------------------------------------
def check_s3(sync: Mapping[str, Any], timeout: float = NETWORK_TIMEOUT) -> Check:
    """HeadBucket on ``[sync.target]`` when its kind is "s3"; credentials from boto3's chain."""
    target: Mapping[str, Any] = sync["target"] if isinstance(sync.get("target"), dict) else {}
    if target.get("kind") != "s3":
        return Check("s3", SKIP, "no [sync.target] of kind \"s3\"")
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    bucket = str(target.get("bucket") or "")
    endpoint = target.get("endpoint_url")
    where = f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
    if not bucket:
        return Check("s3", FAIL, "sync.target.bucket is not set", "set sync.target.bucket")
    config = BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1},
                        s3={"addressing_style": "path"} if endpoint else None)
    try:
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=target.get("region"),
                                                config=config)
        client.head_bucket(Bucket=bucket)
    except (NoCredentialsError, PartialCredentialsError):
        return Check("s3", FAIL, f"{where}: no AWS credentials",
                     "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (e.g. in /etc/annotator/annotator.env) or a profile")
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return Check("s3", FAIL, f"{where}: bucket does not exist", "create the bucket or fix sync.target.bucket")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Check("s3", FAIL, f"{where}: access denied ({code})",
                         "check the AWS keys and that they may read and write this bucket")
        return Check("s3", FAIL, f"{where}: {code or exc}", "check sync.target and the S3 server's logs")
    except BotoCoreError as exc:
        return Check("s3", FAIL, f"{where}: unreachable: {exc}",
                     "check sync.target.endpoint_url / region and the network path to S3")
    except ValueError as exc:  # boto3's "Invalid endpoint: 127.0.0.1:8333" (no scheme) ended the whole report
        return Check("s3", FAIL, f"{where}: {exc}", "fix sync.target.endpoint_url: http(s)://host:port")
    return Check("s3", OK, f"{where} reachable")


def check_review(sync: Mapping[str, Any], timeout: float = NETWORK_TIMEOUT) -> Check:
    """``GET <url>/health`` of a Label Studio ``[sync.review]``; Ground Truth rides on the S3 check."""
    review: Mapping[str, Any] = sync["review"] if isinstance(sync.get("review"), dict) else {}
    kind = review.get("kind")
    if kind in (None, "none"):
        return Check("review", SKIP, "no [sync.review] backend configured")
    if kind != "labelstudio":
        return Check("review", SKIP, f"{kind}: reached through the S3 target")
    # sync.review_settings reads [sync.review.labelstudio] url; a flat [sync.review] url is accepted too.
    nested = review.get("labelstudio") if isinstance(review.get("labelstudio"), dict) else {}
    url = str(nested.get("url") or review.get("url") or "").rstrip("/")
    if not url:
        return Check("review", FAIL, "sync.review.labelstudio.url is not set",
                     "set sync.review.labelstudio.url to the Label Studio server")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:  # noqa: S310 (configured URL)
            body = json.loads(resp.read(4096) or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("review", FAIL, f"Label Studio at {url}: {reason}",
                     "start Label Studio (label-studio start) or fix sync.review.labelstudio.url")
    if body.get("status") != "UP":
        return Check("review", WARN, f"Label Studio at {url} answered {body}", "Label Studio is not healthy yet")
    return Check("review", OK, f"Label Studio at {url} is up")


# The store's SQLite files (the daemon's, the sync journal, the dataset in its default place).
DATABASES = ("store.sqlite3", "sync.sqlite3", "dataset/dataset.sqlite3")


def check_databases(cfg: Any) -> Check:
    """``PRAGMA quick_check`` of the store's databases, read-only. A store copied with ``cp`` or
    ``rsync`` while the units ran (the database torn from its -wal) or restored from a failing
    disk made the daemon and the agent exit with a traceback at start, and every other check
    here said OK."""
    root = Path(cfg.store.root)
    found, bad = [], []
    for name in DATABASES:
        path = root / name
        if not os.path.isfile(path):  # False too in a folder this user may not search (a Check of its own says so)
            continue
        found.append(name)
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
            try:
                result = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
            finally:
                db.close()
        except sqlite3.Error as exc:
            result = [str(exc)]
        if result != ["ok"]:
            bad.append(f"{path}: {' '.join(' '.join(result).split())[:160]}")
    if bad:
        return Check("databases", FAIL, f"damaged: {', '.join(bad)}",
                     "stop the units and restore the store root from a backup made with sqlite3 FILE \".backup "
                     "COPY\" or with the units stopped (a cp of a running store can tear a database from its "
                     "-wal); else sqlite3 FILE \".recover\" | sqlite3 NEW keeps what can be read")
    return Check("databases", OK, f"{', '.join(found)} intact")


# -- the report -----------------------------------------------------------------------------
def run_checks(path: Path | None, env: Mapping[str, str] = os.environ) -> list[Check]:
    """Every check in order; checks that need a valid config are left out when it is invalid."""
    cfg, sync, config_check = load_for_doctor(path, env)
    checks = [config_check]
    if cfg is not None and "sync" in cfg.extra:
        checks.append(check_sync(path, env))
    if cfg is not None:
        checks += check_folders(cfg)
        checks += [_guarded("disk", check_disk, cfg), _guarded("inotify watches", check_watches, cfg),
                   _guarded("bundle", check_bundle, cfg),
                   _guarded("providers", check_providers, cfg)]
        if any(os.path.isfile(Path(cfg.store.root) / name) for name in DATABASES):  # none before the first start
            checks.append(_guarded("databases", check_databases, cfg))
    checks += [check_s3(sync), check_review(sync)]
    clock_folder = Path(cfg.store.root) if cfg is not None else Path(tempfile.gettempdir())
    checks.append(_guarded("clock", check_clock, clock_folder))
    return checks


def _guarded(name: str, check: Callable[..., Check], *args: Any) -> Check:
    """``check(*args)``, or a FAIL naming the file when the file system refuses it (a bundle file
    or a folder this user may not read): one line of the report, not a traceback instead of it."""
    try:
        return check(*args)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return Check(name, FAIL, f"{where}{exc.strerror or exc}",
                     "give the service user access to it and the folders above it, and run doctor as that user "
                     "(sudo -u annotator annotator doctor ...)")


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.level == FAIL for c in checks) else 0


def format_report(checks: Sequence[Check]) -> str:
    """A table (check, result, detail) with one advice line under each WARN or FAIL."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'result':<6}  detail", f"{'-' * width}  ------  {'-' * 40}"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.level:<6}  {c.detail}")
        if c.advice and c.level in (WARN, FAIL):
            lines.append(f"{'':<{width}}  {'':<6}  -> {c.advice}")
    fails, warns = sum(c.level == FAIL for c in checks), sum(c.level == WARN for c in checks)
    lines.append(f"{fails} failed, {warns} warnings" if fails or warns else "all checks passed")
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add ``doctor``, ``status`` and ``healthcheck`` to the ``annotator`` subparsers (see ``service.ops_cli``)."""
    from .ops_cli import register as register_ops

    register_ops(sub)
