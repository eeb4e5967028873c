"""Settings of the dataset and model-pull tasks: the ``[sync.dataset]`` and ``[sync.models]``
tables of the daemon's TOML file (kept in ``SyncConfig.tables`` by ``sync.config``).

::

    [sync.dataset]
    root = "dataset"                 # default <store root>/dataset
    holdout_fraction = 0.2           # reviewed images set aside for the gate (fixed at creation)

    [sync.models]
    root = "models"                  # default <store root>/models; point engine.bundle at <root>/current
    public_key = "registry.pub"      # ed25519 key; set: every bundle must carry a valid bundle.sig
    margin = 0.02                    # the gate: how much worse a candidate may score (absolute)
    min_holdout = 20                 # fewer reviewed hold-out images: a gross regression only
    daemon = "127.0.0.1:50051"       # where to send ReloadModels (absent: no reload call)
    poll_interval = 300.0            # seconds between pulls of the long-running loop

    [sync.models.registry]           # the same keys as [sync.target]
    kind = "local"                   # "local" (a folder) or "s3"
    root = "/srv/model-registry"
    # bucket, prefix, endpoint_url, region for "s3"

Relative paths are taken relative to ``base`` (the config file's folder). Command-line options
override these values (``settings_from``'s ``overrides``). Errors name the key and where its
value came from: the file (``source``) or the command line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import _TARGET_KEYS, TargetConfig, at, check_target, host_port_problem
from .config import checked_table as _checked
from .errors import SyncConfigError

_DATASET_KEYS = {"root": str, "holdout_fraction": (int, float)}
_MODELS_KEYS = {"root": str, "public_key": str, "margin": (int, float), "min_holdout": int, "daemon": str,
                "poll_interval": (int, float), "registry": dict}
_REGISTRY_KEYS = {f.name for f in dataclasses.fields(TargetConfig)}  # == _TARGET_KEYS


@dataclass(frozen=True)
class PullSettings:
    """Paths and knobs of the dataset and model-pull tasks, validated."""

    store_root: Path
    dataset_root: Path
    holdout_fraction: float
    models_root: Path
    registry: TargetConfig | None
    public_key: Path | None
    margin: float
    min_holdout: int
    daemon: str | None
    poll_interval: float
    daemon_token: str | None = dataclasses.field(default=None, repr=False)  # its [server] token; never logged
    daemon_tls: Any = dataclasses.field(default=None, repr=False)  # service.client.TlsOptions when it serves TLS
    key_source: str = ""  # where public_key was set ("from /etc/annotator.toml", "from the command line")


def settings_from(store_root: Path, tables: Mapping[str, Any], base: Path,
                  overrides: Mapping[str, Any] | None = None, source: str = "") -> PullSettings:
    """Build ``PullSettings``; ``overrides`` (command line) use the same keys as the tables,
    ``registry`` given as a folder path. None values in ``overrides`` are ignored. ``source``
    (``SyncConfig.source``: where ``tables`` were read) ends the errors about the tables' values."""
    ds = _checked(tables.get("dataset", {}), _DATASET_KEYS, "sync.dataset", source)
    md = _checked(tables.get("models", {}), _MODELS_KEYS, "sync.models", source)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}

    def w(key: str) -> str:  # where ``key``'s value came from
        return " (from the command line)" if key in over else at(source)
    store_root = Path(over.get("store_root", store_root))

    def path(value: Any, default: Path) -> Path:
        return default if value is None else (base / Path(value))

    registry: TargetConfig | None = None
    if "registry" in over:
        registry = TargetConfig(kind="local", root=Path(over["registry"]))
    elif "registry" in md:
        # The types and values [sync.target] is held to: any type was taken here, and a
        # multipart_threshold_mb = "16" or a bucket = "s3://..." failed only at the first pull.
        reg = _checked(md["registry"], _TARGET_KEYS, "sync.models.registry", source)
        check_target(reg, "sync.models.registry", source)
        if reg.get("kind", "local") == "local" and not reg.get("root"):
            raise SyncConfigError(f"sync.models.registry.root: required for a local registry folder{at(source)}")
        registry = TargetConfig(**{**reg, "root": path(reg.get("root"), Path("registry"))})
    fraction = float(over.get("holdout_fraction", ds.get("holdout_fraction", 0.2)))
    margin = float(over.get("margin", md.get("margin", 0.02)))
    min_holdout = int(over.get("min_holdout", md.get("min_holdout", 20)))
    poll = float(over.get("poll_interval", md.get("poll_interval", 300.0)))
    if not 0.0 <= fraction <= 1.0:
        raise SyncConfigError(f"sync.dataset.holdout_fraction: expected 0..1, got {fraction}{w('holdout_fraction')}")
    if not 0.0 <= margin <= 1.0:
        raise SyncConfigError(f"sync.models.margin: expected 0..1, got {margin}{w('margin')}")
    if min_holdout < 1:
        raise SyncConfigError(f"sync.models.min_holdout: expected >= 1, got {min_holdout}{w('min_holdout')}")
    if poll < 0:
        raise SyncConfigError(f"sync.models.poll_interval: expected >= 0, got {poll}{w('poll_interval')}")
    daemon = over.get("daemon", md.get("daemon"))
    if daemon is not None and (problem := host_port_problem(daemon)):
        raise SyncConfigError(f"sync.models.daemon: {problem}, got {daemon!r}{w('daemon')}")
    key = Path(over["public_key"]) if "public_key" in over else path(md.get("public_key"), Path()) \
        if md.get("public_key") else None
    return PullSettings(
        store_root=store_root,
        dataset_root=Path(over["dataset_root"]) if "dataset_root" in over else path(ds.get("root"), store_root / "dataset"),
        holdout_fraction=fraction,
        models_root=Path(over["models_root"]) if "models_root" in over else path(md.get("root"), store_root / "models"),
        registry=registry, public_key=key,
        margin=margin, min_holdout=min_holdout, daemon=daemon, poll_interval=poll,
        key_source="from the command line" if "public_key" in over else source)


def check_public_key(settings: PullSettings) -> None:
    """Read ``[sync.models] public_key`` now (``SyncConfigError`` naming it), for the agent's start
    and ``annotator doctor``: the puller read it only when built, so doctor passed a missing key
    that ``annotator sync`` then refused. Not in ``settings_from``: ``dataset`` and ``models
    list`` commands use no key and ran where it cannot be read (a copy of the config)."""
    if settings.public_key is None:
        return
    from service.errors import ConfigError
    from service.signing import load_public_key

    try:
        load_public_key(settings.public_key, key_name="sync.models.public_key")
    except ConfigError as exc:
        raise SyncConfigError(f"{exc}{at(settings.key_source)}") from exc
