"""The sync agent's configuration: the ``[sync]`` table of the daemon's TOML file.

::

    [store]
    root = "annotator-data"          # the daemon's store; the agent reads the same one

    [sync]
    appliance_id = "cabin-lab-01"    # names this box in keys and manifests (default: host name)
    batch_size = 50                  # images per upload batch / manifest
    max_side = 1280                  # downscale larger images for upload (absent: originals)
    jpeg_quality = 90
    poll_interval = 10.0             # seconds between passes when there is nothing to do
    retry_base = 0.5                 # backoff: first ceiling, seconds (doubles per attempt) ...
    retry_cap = 60.0                 # ... up to this
    retry_attempts = 8               # tries per object in one pass before the pass gives up
    metrics_listen = "127.0.0.1:9465"   # Prometheus metrics of the agent (absent: none served)
    # store_root = "..."             # only to override [store] root

    [sync.target]
    kind = "s3"                      # "local" (default: a folder laid out like the bucket) or "s3"
    root = "outbox"                  # local: the folder (default <store root>/outbox)
    bucket = "edge-review"           # s3
    prefix = "edge"                  # both: key prefix
    endpoint_url = "http://127.0.0.1:8333"   # s3-compatible servers; absent: AWS
    region = "eu-central-1"
    sse = "aws:kms"                  # "AES256", "aws:kms" or absent
    kms_key_id = "alias/edge"
    multipart_threshold_mb = 16

Other ``[sync.*]`` subtables (``review``: ``sync.review_settings``; ``dataset``, ``models``:
``sync.pull_settings``; ``training``: ``sync.training_settings``) are kept in ``SyncConfig.tables``
for their tasks; any other subtable is refused (``SYNC_TABLES``). Relative paths are
taken relative to the file's folder. Credentials are not configured here: boto3's standard
chain finds them. ``ANNOTATOR_CONFIG`` names the file when no ``--config`` is given.

One file serves ``annotator serve`` and ``annotator sync``: ``load_sync_config`` reads it
through ``service.config.load_config`` (which validates the daemon's tables and passes
``[sync]`` through), so the agent sees the same ``[store] root`` as the daemon, environment
overrides (``ANNOTATOR_STORE__ROOT``) included, and finds the daemon at ``[server] listen``.
That root is taken as the daemon takes it: ``load_config`` has made file values absolute
(relative to the file's folder) and environment values too (relative to the working
directory); the default ``annotator-data`` is the working directory's, as for the daemon.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import socket
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import SyncConfigError
from .objectstore import LocalFolderStore, ObjectStore

_SYNC_KEYS = {"appliance_id": str, "batch_size": int, "max_side": int, "jpeg_quality": int,
              "poll_interval": (int, float), "retry_base": (int, float), "retry_cap": (int, float),
              "retry_attempts": int, "store_root": str, "metrics_listen": str}
_TARGET_KEYS = {"kind": str, "root": str, "bucket": str, "prefix": str, "endpoint_url": str, "region": str,
                "sse": str, "kms_key_id": str, "multipart_threshold_mb": int}


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetConfig:
    kind: str = "local"
    root: Path | None = None
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    sse: str | None = None
    kms_key_id: str | None = None
    multipart_threshold_mb: int = 16


@dataclass(frozen=True)
class SyncConfig:
    store_root: Path
    appliance_id: str
    target: TargetConfig = field(default_factory=TargetConfig)
    batch_size: int = 50
    max_side: int | None = None
    jpeg_quality: int = 90
    poll_interval: float = 10.0
    retry_base: float = 0.5
    retry_cap: float = 60.0
    retry_attempts: int = 8
    tables: Mapping[str, Any] = field(default_factory=dict)
    base: Path = field(default_factory=Path.cwd)  # the config file's folder (relative paths)
    metrics_listen: tuple[str, int] | None = None  # (host, port) of the agent's /metrics
    daemon_listen: str = "127.0.0.1:50051"  # the daemon's [server] listen (ReloadModels)
    daemon_token: str | None = field(default=None, repr=False)  # its [server] token; never logged
    daemon_tls: Any = field(default=None, repr=False)  # service.client.TlsOptions when it serves TLS
    # Where the [sync] tables were read ("from /etc/annotator/annotator.toml"; "defaults" without a file)
    # and where store_root came from ([sync] store_root, [store] root, ANNOTATOR_STORE__ROOT...):
    # every error about a [sync.*] value names them (``at``), as the daemon's do.
    source: str = ""
    store_root_source: str = ""
    # The daemon's [engine] bundle and where it was set: the bundles the agent and ``annotator
    # models`` install under <models root>/current are the daemon's only when it names that link
    # (``models_cli.bundle_elsewhere``).
    daemon_bundle: Path | None = None
    daemon_bundle_source: str = ""

    @property
    def daemon_address(self) -> str | None:
        """Where to reach the daemon from this host: ``listen`` with a wildcard host replaced by
        loopback; None when the daemon picks its port at start (port 0)."""
        host, _, port = self.daemon_listen.rpartition(":")
        if port in ("", "0"):
            return None
        if host in ("0.0.0.0", "", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{port}"


# The [sync.*] subtables and the tasks that read them: a misspelt one ([sync.model]) would
# otherwise leave its task on defaults (or off) without a word.
SYNC_TABLES = ("target", "review", "dataset", "models", "training")


def default_appliance_id() -> str:
    """The host name, reduced to the characters allowed in an appliance id."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")
    return (name or "appliance")[:64]


def journal_appliance_id(store_root: Path) -> str | None:
    """The appliance id this store's sync journal last uploaded under (the ``<id>`` of its newest
    ``manifests/<id>/`` key, else of its newest ``preannotations/<id>/`` key); None without a
    journal or such a key, or when it cannot be read (the journal's own open says why)."""
    path = Path(store_root) / "sync.sqlite3"  # sync.uploader.JOURNAL_NAME (not imported: boto3-free)
    if not os.path.isfile(path):  # not Path.is_file: it raises in a store folder this user may not search
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            row = (db.execute("SELECT manifest_key FROM batches WHERE manifest_key IS NOT NULL "
                              "ORDER BY seq DESC LIMIT 1").fetchone()
                   or db.execute("SELECT pre_key FROM items WHERE pre_key IS NOT NULL "
                                 "ORDER BY rowid DESC LIMIT 1").fetchone())
        finally:
            db.close()
    except sqlite3.Error:
        return None
    parts = str(row[0]).split("/") if row else []
    return parts[-2] if len(parts) >= 3 else None


def kept_appliance_id(before: str, now: str, store_root: Path, source: str) -> str:
    """What the agent says when ``appliance_id`` is not set and the host name (its default) is not
    the id the store's journal uploaded under (a new or renamed host, a restored store, a container
    made again: its host name is the new container's id). It goes on under the journal's id: the
    reviews of what it sent are collected under that id only (``groundtruth/output/<id>``, ``edge
    review <id>``), and under the host name none of them was ever merged, without a word."""
    return (f"sync.appliance_id: not set, and this store's sync journal ({Path(store_root) / 'sync.sqlite3'}) "
            f"uploaded under {before!r}, not under the host name {now!r}: going on as {before!r}, so that the "
            f"reviews of what it sent are collected; set appliance_id in [sync]{at(source)} to choose "
            f"(appliance_id = \"{now}\" starts anew under the new name, leaving those reviews)")


def at(source: str) -> str:
    """`` (from /etc/annotator.toml)`` for the end of an error message; "" for no source.
    ``[sync.*]`` errors named the key but not the file (nor the environment variable a token
    came from): on a box with several configs, or one given by ``ANNOTATOR_CONFIG`` in a unit
    file, the operator had to find which file the agent had read."""
    return f" ({source})" if source else ""


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "a table", list: "a list",
               bool: "true or false"}


def expected_type(allowed: Any) -> str:
    """``(int, float)`` -> ``"a number"``, ``str`` -> ``"a string"``: what a TOML writer knows,
    not ``<class 'int'>``."""
    kinds = allowed if isinstance(allowed, tuple) else (allowed,)
    if float in kinds:
        return "a number"
    return " or ".join(_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)


def suggest(name: str, known: Any, shown: str = "{}") -> str:
    """``"; did you mean 'batch_size'?"`` for the closest of ``known``, else ``"; known: ..."``
    (each formatted with ``shown``): a typo's message names the key meant, as
    ``service.config`` does for the daemon's tables."""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1, cutoff=0.6)
    if close:
        return f"; did you mean {shown.format(close[0])!r}?"
    return f"; known: {', '.join(shown.format(k) for k in known)}"


def host_port_problem(value: str) -> str | None:
    """None when ``value`` is ``host:port`` (port 0..65535, an IPv6 host in brackets), else what
    to write instead. A port-less ``127.0.0.1`` in ``[sync.models] daemon`` was taken and failed
    only when first used: the reload after a pull, hours after the start."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "expected host:port with a port in 0..65535, e.g. '127.0.0.1:50051'"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return "expected an IPv6 address in brackets, e.g. '[::1]:50051'"
    return None


def endpoint_problem(url: str) -> str | None:
    """None when ``url`` is an http(s) URL with a host (an S3-compatible server's endpoint),
    else what is expected. boto3 refuses a scheme-less ``127.0.0.1:8333`` only when its client
    is made (a traceback-free ``error: Invalid endpoint`` naming no key), and an ``htp://``
    one at every request, retried for ever in the background."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected http(s)://host[:port], e.g. 'http://127.0.0.1:8333'"
    return None


# botocore's own rule for a bucket name (S3-compatible servers allow more than AWS's 3-63
# lower-case letters): a stricter one would refuse a bucket that works.
_BUCKET = re.compile(r"[A-Za-z0-9.\-_]{1,255}")


def bucket_problem(bucket: str) -> str | None:
    """None for a plain bucket name, else what to write instead (``s3://edge-review`` went to
    S3 as the bucket name and stopped the agent with botocore's parameter message)."""
    if bucket.startswith("arn:"):  # an access point's or an Outposts bucket's ARN, which boto3 takes as Bucket
        return None
    if "://" in bucket:
        name, _, key = bucket.partition("://")[2].partition("/")
        hint = f"bucket = {name!r}" + (f" and prefix = {key.strip('/')!r}" if key.strip("/") else "")
        return f"expected a bucket name, not a URL: {hint}"
    if "/" in bucket:
        name, _, key = bucket.partition("/")
        return f"expected a bucket name without '/': bucket = {name!r}" + \
            (f" and prefix = {key.strip('/')!r}" if key.strip("/") else "")
    if not _BUCKET.fullmatch(bucket):
        return "expected a bucket name (letters, digits, '.', '-', '_')"
    return None


def check_target(target: Mapping[str, Any], where: str, source: str = "") -> None:
    """The value checks of a ``[sync.target]``-like table (``kind``, ``bucket``, ``endpoint_url``,
    ``sse``, ``kms_key_id``, ``multipart_threshold_mb``), types already checked; ``where``
    names the table (``sync.target``, ``sync.models.registry``) in the error."""
    at = f" ({source})" if source else ""
    kind = target.get("kind", "local")
    if kind not in ("local", "s3"):
        raise SyncConfigError(f"{where}.kind: expected 'local' or 's3', got {kind!r}{at}")
    if kind == "s3" and not target.get("bucket"):
        raise SyncConfigError(f"{where}.bucket: required when kind = 's3'{at}")
    if target.get("bucket") and (problem := bucket_problem(target["bucket"])):
        raise SyncConfigError(f"{where}.bucket: {problem}, got {target['bucket']!r}{at}")
    if target.get("endpoint_url") and (problem := endpoint_problem(target["endpoint_url"])):
        raise SyncConfigError(f"{where}.endpoint_url: {problem}, got {target['endpoint_url']!r}{at}")
    if target.get("sse") not in (None, "AES256", "aws:kms"):
        raise SyncConfigError(f"{where}.sse: expected 'AES256' or 'aws:kms', got {target['sse']!r}{at}")
    if target.get("kms_key_id") and target.get("sse") != "aws:kms":
        raise SyncConfigError(f"{where}.kms_key_id: needs sse = 'aws:kms'{at}")
    if target.get("multipart_threshold_mb", 16) < 5:
        raise SyncConfigError(f"{where}.multipart_threshold_mb: expected >= 5 (S3's part minimum){at}")


def checked_table(table: Any, allowed: Mapping[str, Any], where: str, source: str = "") -> dict[str, Any]:
    """``table`` as a dict when it is a table of known keys with values of the allowed types;
    ``source`` (``SyncConfig.source``) ends each error."""
    if not isinstance(table, dict):
        raise SyncConfigError(f"{where}: expected a table, got {table!r}{at(source)}")
    for key, value in table.items():
        if key not in allowed:
            raise SyncConfigError(f"{where}.{key}: unknown key{at(source)}{suggest(key, sorted(allowed))}")
        if (isinstance(value, bool) and allowed[key] is not bool) or not isinstance(value, allowed[key]):
            raise SyncConfigError(f"{where}.{key}: expected {expected_type(allowed[key])}, got {value!r}{at(source)}")
    return dict(table)


def _check(table: Mapping[str, Any], allowed: Mapping[str, Any], where: str, source: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and where == "sync":
            continue  # a subtable for another task
        if key not in allowed:
            raise SyncConfigError(f"{where}.{key}: unknown key ({source}){suggest(key, sorted(allowed))}")
        if isinstance(value, bool) or not isinstance(value, allowed[key]):
            raise SyncConfigError(f"{where}.{key}: expected {expected_type(allowed[key])}, got {value!r} ({source})")
        out[key] = value
    return out


def sync_config_from_dict(doc: Mapping[str, Any], base: Path, source: str = "config",
                          store_root_source: str = "") -> SyncConfig:
    """Build and validate a ``SyncConfig`` from a parsed TOML document; ``base`` resolves relative
    paths; ``source`` says where the document came from and ``store_root_source`` where its
    ``[store] root`` did (kept in the ``SyncConfig`` for the errors of the ``[sync.*]`` tables)."""
    sync_table = doc.get("sync", {})
    if not isinstance(sync_table, dict):
        raise SyncConfigError(f"sync: expected a [sync] table ({source})")
    values = _check(sync_table, _SYNC_KEYS, "sync", source)
    for key, value in sync_table.items():
        if isinstance(value, dict) and key not in SYNC_TABLES:
            raise SyncConfigError(f"[sync.{key}]: unknown table ({source}){suggest(key, SYNC_TABLES, '[sync.{}]')}")
    target_table = sync_table.get("target", {})
    target = _check(target_table, _TARGET_KEYS, "sync.target", source)
    if values.get("store_root"):
        store_root_source = f"sync.store_root, {source}"
    store_root = values.pop("store_root", None) or doc.get("store", {}).get("root", "annotator-data")
    store_root = base / Path(store_root)
    check_target(target, "sync.target", source)
    root = base / target["root"] if "root" in target else store_root / "outbox"
    tcfg = TargetConfig(**{**target, "root": root})
    for key, low in (("batch_size", 1), ("max_side", 16), ("jpeg_quality", 1), ("retry_attempts", 1)):
        if key in values and values[key] < low:
            raise SyncConfigError(f"sync.{key}: expected >= {low}, got {values[key]} ({source})")
    for key in ("poll_interval", "retry_base", "retry_cap"):
        if key in values and values[key] < 0:
            raise SyncConfigError(f"sync.{key}: expected >= 0, got {values[key]} ({source})")
    if values.get("jpeg_quality", 90) > 100:
        raise SyncConfigError(f"sync.jpeg_quality: expected <= 100, got {values['jpeg_quality']} ({source})")
    if "appliance_id" not in values:
        values["appliance_id"] = default_appliance_id()
        if (before := journal_appliance_id(store_root)) not in (None, values["appliance_id"]):
            log.warning("%s", kept_appliance_id(before, values["appliance_id"], store_root, source))
            values["appliance_id"] = before
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", values["appliance_id"]):
        raise SyncConfigError(f"sync.appliance_id: expected 1-64 of A-Z a-z 0-9 . _ -, got "
                              f"{values['appliance_id']!r} ({source})")
    metrics = values.pop("metrics_listen", None)
    metrics_listen = None
    if metrics is not None:
        if problem := host_port_problem(metrics):
            raise SyncConfigError(f"sync.metrics_listen: {problem}, got {metrics!r} ({source})")
        host, _, port = metrics.rpartition(":")
        metrics_listen = (host.strip("[]"), int(port))
    server = doc.get("server", {}) if isinstance(doc.get("server", {}), dict) else {}
    tables = {k: v for k, v in sync_table.items() if isinstance(v, dict) and k != "target"}
    for key in ("poll_interval", "retry_base", "retry_cap"):
        if key in values:
            values[key] = float(values[key])
    fields: dict[str, Any] = values
    return SyncConfig(store_root=store_root, target=tcfg, tables=tables, base=base, metrics_listen=metrics_listen,
                      daemon_listen=str(server.get("listen", "127.0.0.1:50051")),
                      daemon_token=server.get("token"), source=source, store_root_source=store_root_source, **fields)


def load_sync_config(path: Path | None = None, env: Mapping[str, str] = os.environ) -> SyncConfig:
    """Read ``path`` (or ``$ANNOTATOR_CONFIG``; neither: all defaults) and build the ``SyncConfig``.

    The file is the daemon's too: its tables are validated by ``service.config.load_config``
    (same errors, same environment overrides), then ``[sync]`` is validated here.
    """
    from service.config import load_config
    from service.errors import ConfigError

    if path is None and env.get("ANNOTATOR_CONFIG"):
        path = Path(env["ANNOTATOR_CONFIG"])
    if path is not None:
        # Relative paths in it: relative to its folder, from anywhere. absolute(), not resolve():
        # service.config joins the daemon's paths to the folder the file is named in, and a
        # symlinked /etc/annotator/annotator.toml must not send the agent to the link target's.
        path = Path(path).absolute()
    try:
        shared = load_config(path, env=env)
    except ConfigError as exc:
        raise SyncConfigError(str(exc)) from exc
    # Absolute here, so sync_config_from_dict does not join it to the file's folder: only the
    # default is still relative, and the daemon reads that from its working directory.
    doc = {"sync": dict(shared.extra.get("sync", {})), "store": {"root": str(Path(shared.store.root).absolute())},
           "server": {"listen": shared.server.listen, "token": shared.server.token}}
    root_source = f"store.root, {shared.source_of('store.root')}"
    bundle = {"daemon_bundle": None if shared.engine.bundle is None else Path(shared.engine.bundle),
              "daemon_bundle_source": shared.source_of("engine.bundle")}
    if path is None:
        return dataclasses.replace(sync_config_from_dict(doc, Path.cwd(), "defaults", root_source), **bundle)
    cfg = dataclasses.replace(sync_config_from_dict(doc, path.parent, f"from {path}", root_source), **bundle)
    s = shared.server
    if s.tls_cert and s.tls_key:  # the daemon serves TLS only: reloads must speak it too
        from service.client import TlsOptions

        try:
            tls = TlsOptions.for_own_server(s.tls_cert, s.tls_key, s.tls_client_ca)
        except OSError as exc:
            raise SyncConfigError(f"server.tls_cert: cannot read the daemon's TLS files ({exc}) "
                                  f"to reach it for reloads ({shared.source_of('server.tls_cert')})") from exc
        cfg = dataclasses.replace(cfg, daemon_tls=tls)
    return cfg


def open_target(cfg: TargetConfig, section: str = "sync.target") -> ObjectStore:
    """The configured object store (boto3 is imported only for ``kind = "s3"``); ``section``: the
    table it was given in, named when its bucket does not exist."""
    if cfg.kind == "local":
        return LocalFolderStore(cfg.root or Path("outbox"), cfg.prefix)
    from .s3store import S3Store

    return S3Store(cfg.bucket or "", cfg.prefix, endpoint_url=cfg.endpoint_url, region=cfg.region, sse=cfg.sse,
                   kms_key_id=cfg.kms_key_id, multipart_threshold=cfg.multipart_threshold_mb << 20,
                   setting=f"[{section}] bucket")
