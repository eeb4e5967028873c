"""The appliance's configuration: one immutable ``Config`` from one TOML file, the environment
and the command line.

Precedence, highest first: ``overrides`` (command line, dotted keys like ``"server.listen"``) >
environment (``ANNOTATOR_<SECTION>__<KEY>``, e.g. ``ANNOTATOR_SERVER__LISTEN``) > the TOML file
> the defaults below. ``ANNOTATOR_CONFIG`` names the file when no path is given. Nothing is
read at import time; ``load_config`` reads only what it is handed.

Every value is checked: a wrong type, a value out of range or an unknown key raises
``ConfigError`` whose message starts with the dotted key and says where the value came from,
e.g. ``judge.threshold: expected a number in [0, 1], got 1.5 (from /etc/annotator.toml)``.
Relative paths in the file are taken relative to the file's folder; relative paths from the
environment or the command line relative to the working directory, as a shell user expects.
Both are made absolute here (the defaults stay as declared), so every reader of the same file
and environment (the daemon, ``sync.config``, ``annotator doctor``) sees the same folders
whatever it does with relative paths; an absolute path is never rebased.
``deploy/annotator.example.toml`` documents every key.

Tables owned by other programs that read the same file (``PASSTHROUGH``: ``[sync]`` and its
subtables, read by ``sync.config``) are not validated here; they are kept raw, as parsed, in
``Config.extra`` (e.g. ``cfg.extra["sync"]["target"]["bucket"]``). Every other unknown table
is still refused with a did-you-mean hint. They have no environment overrides: an
``ANNOTATOR_SYNC__<KEY>`` is refused with a message saying so (by the daemon and the agent alike).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import socket
import copy
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

ENV_PREFIX = "ANNOTATOR_"
MiB = 1 << 20
_NONE_WORDS = ("", "none", "null")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
PASSTHROUGH = ("sync",)  # top-level tables another program validates (sync.config)
SECRET_KEYS = frozenset({"server.token"})  # never echoed in errors, repr or to_dict


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"  # host:port; port 0 picks a free one
    max_message_bytes: int = 32 * MiB
    max_concurrent_streams: int | None = 16  # open AnnotateStream calls on the whole server (not sent to HTTP/2)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed
    # set: clients must send "authorization: Bearer <token>"; a secret: kept out of repr and errors
    token: str | None = field(default=None, repr=False)
    allow_insecure: bool = False  # allow a non-loopback address without TLS or token


@dataclass(frozen=True)
class StoreConfig:
    root: Path = Path("annotator-data")
    lease_seconds: float = 60.0
    min_free_mb: int = 500  # megabytes (10^6 bytes) of free disk below which ingest pauses


@dataclass(frozen=True)
class DropConfig:
    folder: Path | None = None
    processed_mode: str = "move"  # "move" (to processed/), "keep" or "delete"
    stable_seconds: float = 2.0  # a file must be unchanged this long before it is taken
    max_bytes: int = 64 * MiB
    max_pixels: int = 50_000_000
    poll_interval: float = 1.0  # seconds
    remove_empty_hours: float = 0.0  # > 0: empty recording folders (<camera>/<session>/) untouched this long go


@dataclass(frozen=True)
class EngineConfig:
    bundle: Path | None = None
    bundle_public_key: Path | None = None  # set: every bundle loaded needs a valid bundle.sig (ed25519)
    providers: tuple[str, ...] = ()  # empty: every available provider in priority order
    batch_size: int = 8  # images claimed, finished and committed together (one transaction per batch)
    run_batch: int = 0  # images per session.run; 0 = batch_size on a GPU provider, 1 on the CPU
    workers: int = 2  # inference threads sharing the sessions
    threads: int = 0  # onnxruntime intra-op threads per session; 0 = CPU cores / workers (at least 1)
    # "square": every image letterboxed to the models' square input (what the bundle's thresholds
    # were calibrated on); "rect": padded only to a multiple of 32 (a 4:3 camera at 320 x 256:
    # 1.2-1.3x images/s on the CPU, labels change slightly; README "The inference engine").
    letterbox: str = "square"
    # A batch step (a worker's decode and inference, the finisher's judge, sidecars and commit)
    # running longer than this is a wedge (a hung disk, a driver): the daemon reports itself
    # unhealthy (systemd watchdog, gRPC health) and is restarted; its images come back by lease.
    # Generous: TensorRT builds its engines inside the first batches of each input shape.
    stall_seconds: float = 1800.0


REVIEW_WINDOW = 500  # default of judge.review_window: images a ReviewShare ranks against (service.judge)


@dataclass(frozen=True)
class JudgeConfig:
    score_fn: str = "default"  # "default" or "package.module:function"
    threshold: float | None = None  # None: the bundle's judgement.score_threshold
    audit_fraction: float | None = None  # None: the bundle's judgement.audit_fraction
    seed: int = 0
    hourly_budget: int | None = None  # most reviews per UTC hour; None = no limit
    daily_budget: int | None = None
    near_duplicate: bool = True
    near_duplicate_distance: int = 6  # dHash bits (of 64)
    near_duplicate_memory: int = 64  # review frames remembered per camera
    reviews_per_session: int | None = None  # most reviews per declared recording; None = no limit
    review_share: float | None = None  # review only the most doubtful share of the stream; None = off
    review_window: int = REVIEW_WINDOW  # images the share ranks against (the last ones scored)

    @property
    def score_threshold(self) -> float | None:
        """Alias of ``threshold`` (the name the bundle manifest uses)."""
        return self.threshold


@dataclass(frozen=True)
class OutputsConfig:
    sidecar_dir: Path | None = None  # set: a JSON sidecar per annotated image


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # host:port of the Prometheus endpoint; empty: no metrics server
    allow_remote: bool = False  # allow a non-loopback `listen` (metrics have no TLS or token)


@dataclass(frozen=True)
class RetentionConfig:
    # Days after which files go (None: kept for ever). Run by the daemon every interval_minutes,
    # or once by `annotator prune`. See service/retention.py.
    processed_days: float | None = None  # drop folder's processed/ copies whose bytes the store holds
    auto_image_days: float | None = None  # the store's bytes of auto-accepted images (records stay)
    quarantine_days: float | None = None  # quarantined files with their reasons (drop folder's or store's quarantine/)
    interval_minutes: float = 60.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    drop: DropConfig = field(default_factory=DropConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    # PASSTHROUGH tables as parsed from the file (read-only at the top level), e.g. extra["sync"].
    extra: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}), compare=False)
    # Where each value not left at its default came from ("from /etc/annotator.toml", "from
    # environment ANNOTATOR_STORE__ROOT", "from the command line"): ``source_of``.
    sources: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}), compare=False, repr=False)

    def source_of(self, key: str) -> str:
        """Where the dotted ``key``'s value came from, as ``load_config``'s errors say it
        (``from /etc/annotator.toml``, ``from environment ANNOTATOR_DROP__FOLDER``...), or
        ``the default``: for a message about a value found wrong after loading (a folder
        that does not exist, a store another program reads) that names the file or variable to fix."""
        return self.sources.get(key, "the default")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values by section (paths as strings, tuples as lists), e.g. to show the config."""
        def plain(v: Any) -> Any:
            return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        def shown(key: str, v: Any) -> Any:
            return "<set>" if key in SECRET_KEYS and v else plain(v)
        return {s: {k: shown(f"{s}.{k}", v) for k, v in dataclasses.asdict(getattr(self, s)).items()} for s in SECTIONS}

    def require(self, *keys: str) -> None:
        """Raise ``ConfigError`` for the first dotted key that is not set (None)."""
        for key in keys:
            section, _, name = key.partition(".")
            if getattr(getattr(self, section), name) is None:
                raise ConfigError(f"{key}: required here but not set (file, {env_name(key)} or --set {key}=...)")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)  # type: ignore[misc]
                             if f.name not in ("extra", "sources")}
KEYS: dict[str, Any] = {f"{s}.{k}": t for s, cls in SECTIONS.items() for k, t in typing.get_type_hints(cls).items()}


def env_name(key: str) -> str:
    """``server.listen`` -> ``ANNOTATOR_SERVER__LISTEN``."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(KEYS) + list(SECTIONS) + list(PASSTHROUGH), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(KEYS))}"
    return ConfigError(f"{key}: unknown key ({source}){hint}")


def _convert(key: str, value: Any, source: str, from_text: bool) -> Any:
    """Bring ``value`` to the key's declared type; text (environment, command line) is parsed."""
    kind = KEYS[key]
    optional = type(None) in typing.get_args(kind)
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind

    def bad(expected: str) -> ConfigError:
        got = "a value of another type" if key in SECRET_KEYS else repr(value)
        return ConfigError(f"{key}: expected {expected}, got {got} ({source})")

    if value is None or (from_text and optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise bad(f"a value ({base.__name__ if isinstance(base, type) else base})")
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if base in (int, float):
        if isinstance(value, str) and from_text:
            try:
                value = int(value) if base is int else float(value)
            except ValueError:
                raise bad("an integer" if base is int else "a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (base is int and not isinstance(value, int)):
            raise bad("an integer" if base is int else "a number")
        return base(value)
    if base is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise bad("a path")
        return Path(value)
    if typing.get_origin(base) is tuple:
        if isinstance(value, str) and from_text:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    raise AssertionError(f"{key}: no converter for {kind}")  # a new field type needs a branch here


def _in(lo: float, hi: float | None = None) -> Callable[[Any], bool]:
    return lambda v: v is None or (v >= lo and (hi is None or v <= hi))


def _listen_ok(v: str) -> bool:
    """``host:port``; an IPv6 host in brackets, a dotted-quad host a valid IPv4 address. gRPC
    read ``::1:5000`` as the address ``::1:5000`` on port 443, and ``127.0.0.256`` was called
    "reachable from other machines" (it is no address); both failed with a bind error at best."""
    host, sep, port = v.rpartition(":")
    if not (sep and host and port.isdigit() and 0 <= int(port) <= 65535):
        return False
    try:
        if host.startswith("[") and host.endswith("]"):
            return ipaddress.ip_address(host[1:-1]).version == 6
        if ":" in host:
            return False
        if all(part.isdigit() for part in host.split(".")):
            ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# Range checks: key -> (test, what is expected).
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "server.listen": (_listen_ok, "host:port with a port in 0..65535, e.g. '127.0.0.1:50051' "
                                  "(an IPv6 address in brackets: '[::1]:50051')"),
    "server.max_message_bytes": (_in(1024, 2**31 - 1), "an integer of bytes in [1024, 2^31 - 1]"),
    "server.max_concurrent_streams": (_in(1), "an integer >= 1 (or unset)"),
    "store.lease_seconds": (lambda v: v > 0, "a number of seconds > 0"),
    "store.min_free_mb": (_in(0), "an integer of megabytes >= 0"),
    "drop.processed_mode": (lambda v: v in ("move", "keep", "delete"), "one of 'move', 'keep', 'delete'"),
    "drop.stable_seconds": (_in(0), "a number of seconds >= 0"),
    "drop.max_bytes": (_in(1), "an integer of bytes >= 1"),
    "drop.max_pixels": (_in(1), "an integer of pixels >= 1"),
    "drop.poll_interval": (lambda v: v > 0, "a number of seconds > 0"),
    "drop.remove_empty_hours": (_in(0), "a number of hours >= 0 (0: never)"),
    "engine.batch_size": (_in(1, 1024), "an integer in [1, 1024]"),
    "engine.threads": (_in(0, 1024), "an integer in [0, 1024]"),
    "engine.run_batch": (_in(0, 1024), "an integer in [0, 1024] (0: batch_size on a GPU, 1 on the CPU)"),
    "engine.workers": (_in(1, 64), "an integer in [1, 64]"),
    "engine.letterbox": (lambda v: v in ("square", "rect"), "'square' or 'rect'"),
    "engine.stall_seconds": (lambda v: v >= 10, "a number of seconds >= 10"),
    "judge.score_fn": (lambda v: v == "default" or (":" in v and all(v.partition(":")[::2])),
                       "'default' or 'package.module:function'"),
    "judge.threshold": (_in(0, 1), "a number in [0, 1]"),
    "judge.audit_fraction": (_in(0, 1), "a number in [0, 1]"),
    "judge.hourly_budget": (_in(0), "an integer >= 0 (or unset for no limit)"),
    "judge.daily_budget": (_in(0), "an integer >= 0 (or unset for no limit)"),
    "judge.near_duplicate_distance": (_in(0, 64), "an integer number of bits in [0, 64]"),
    "judge.near_duplicate_memory": (_in(1, 100000), "an integer number of frames in [1, 100000]"),
    "judge.reviews_per_session": (_in(1), "an integer >= 1 (or unset for no limit)"),
    "judge.review_share": (lambda v: v is None or 0 < v <= 1, "a share in (0, 1], e.g. 0.05 (or unset: every doubtful image)"),
    "judge.review_window": (_in(10, 1000000), "an integer number of images in [10, 1000000]"),
    "retention.processed_days": (lambda v: v is None or v > 0, "a number of days > 0 (or unset: kept for ever)"),
    "retention.auto_image_days": (lambda v: v is None or v > 0, "a number of days > 0 (or unset: kept for ever)"),
    "retention.quarantine_days": (lambda v: v is None or v > 0, "a number of days > 0 (or unset: kept for ever)"),
    "retention.interval_minutes": (lambda v: v >= 1, "a number of minutes >= 1"),
    "metrics.listen": (lambda v: v == "" or _listen_ok(v),
                       "empty (off) or host:port, e.g. '127.0.0.1:9464' (an IPv6 address in brackets)"),
}


def _listen_spelling(key: str, value: Any, source: str) -> Any:
    """The address a listen key names, in the one spelling both servers bind. ``127.1:9464``
    (the shorthand of 127.0.0.1) was refused as no host:port, though it names this machine
    only; gRPC cannot bind it, so it is written out. Only loopback is expanded: ``10.0.0:5``
    is likelier an octet left out than 10.0.0.0, and stays refused. ``:9464`` (no host) means
    every address to Prometheus and Go, this machine to others: refused naming both."""
    if not isinstance(value, str):
        return value
    host, sep, port = value.rpartition(":")
    if sep and not host and port.isdigit():
        raise ConfigError(f"{key}: {value!r} names no host; write '127.0.0.1{value}' for this machine only, "
                          f"or '0.0.0.0{value}' for every address ({source})")
    parts = host.split(".")
    if (sep and 2 <= len(parts) <= 3 and parts[0] == "127"
            and all(p.isdecimal() and p.isascii() and (p == "0" or not p.startswith("0")) for p in parts)):
        try:
            return f"{socket.inet_ntoa(socket.inet_aton(host))}:{port}"
        except OSError:  # a part too large for its bytes: refused by the check as before
            return value
    return value


def _is_loopback(listen: str) -> bool:
    """``localhost`` in any case (a host name is case-blind: ``LOCALHOST`` binds 127.0.0.1 but was
    called reachable from other machines), and an IPv4 loopback written as IPv6
    (``[::ffff:127.0.0.1]``, which Python 3.11's is_loopback does not know)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _cross_checks(cfg: Config) -> None:
    s = cfg.server
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("server.tls_cert: tls_cert and tls_key must be set together")
    if s.tls_client_ca is not None and s.tls_cert is None:
        raise ConfigError("server.tls_client_ca: client certificates need server TLS (tls_cert and tls_key)")
    if not _is_loopback(s.listen) and s.tls_cert is None and not s.token and not s.allow_insecure:
        raise ConfigError(f"server.listen: {s.listen} is reachable from other machines but neither TLS "
                          "(server.tls_cert/tls_key) nor server.token is set; set one, or server.allow_insecure = true")
    m = cfg.metrics
    if m.listen and not _is_loopback(m.listen) and not m.allow_remote:
        raise ConfigError(f"metrics.listen: {m.listen} is reachable from other machines and the metrics endpoint has "
                          "no TLS or token; use a loopback address, or set metrics.allow_remote = true")


def _read_file(path: Path) -> tuple[dict[str, tuple[Any, str]], dict[str, Any]]:
    """(validated values by dotted key with their source, raw PASSTHROUGH tables)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as TOML: {exc}") from exc
    out: dict[str, tuple[Any, str]] = {}
    extra: dict[str, Any] = {}
    source = f"from {path}"
    folder = path.absolute().parent
    for section, body in data.items():
        if section in PASSTHROUGH:
            if not isinstance(body, dict):  # sync.config would fail on it with a Python message
                raise ConfigError(f"{section}: expected a [{section}] table, got {body!r} ({source})")
            extra[section] = copy.deepcopy(body)
            continue
        if section not in SECTIONS:
            raise _unknown(section, source)
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a [{section}] table, got {body!r} ({source})")
        for name, value in body.items():
            key = f"{section}.{name}"
            if key not in KEYS:
                raise _unknown(key, source)
            value = _convert(key, value, source, from_text=False)
            if isinstance(value, Path) and not value.is_absolute():
                value = folder / value
            out[key] = (value, source)
    return out, extra


def _check_single_underscore(name: str) -> None:
    """``ANNOTATOR_STORE_ROOT`` (one underscore after the section) names no variable this reads
    and was ignored without a word; refuse it when the double underscore makes it a known key.
    Other ``ANNOTATOR_*`` names (ANNOTATOR_CONFIG, ANNOTATOR_TOKEN, ...) are not ours to judge."""
    rest = name[len(ENV_PREFIX):].lower()
    for section in SECTIONS:
        if rest.startswith(section + "_") and f"{section}.{rest[len(section) + 1:]}" in KEYS:
            raise ConfigError(f"{name}: not read (a single underscore after the section); did you mean "
                              f"{env_name(section + '.' + rest[len(section) + 1:])}?")


def _absolute(value: Any) -> Any:
    """A relative path from the environment or the command line, joined to the working directory
    now: the sync agent joins relative paths to the config file's folder, and a relative
    ``ANNOTATOR_STORE__ROOT`` sent it to another (empty) store than the daemon's."""
    return value.absolute() if isinstance(value, Path) else value


def load_config(path: Path | None = None, env: Mapping[str, str] = os.environ,
                overrides: Mapping[str, Any] = {}) -> Config:
    """Build and validate the ``Config`` (precedence in the module docstring)."""
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    values, extra = _read_file(Path(path)) if path is not None else ({}, {})
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if "__" not in name:
            _check_single_underscore(name)
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".", 1)
        source = f"from environment {name}"
        if key.partition(".")[0] in PASSTHROUGH:
            # Not a did-you-mean to a daemon key (ANNOTATOR_SYNC__BATCH_SIZE was offered
            # engine.batch_size): the tables another program reads have no overrides.
            section, _, rest = key.partition(".")
            *tables, leaf = rest.split("__")
            raise ConfigError(f"{name}: the [{section}] tables are read from the file only (no environment "
                              f"overrides); set {leaf} in [{'.'.join([section, *tables])}] of the config file "
                              "and unset the variable")
        if key not in KEYS:
            raise _unknown(key, source)
        values[key] = (_absolute(_convert(key, text, source, from_text=True)), source)
    for key, value in overrides.items():
        source = "from the command line"
        if key not in KEYS:
            raise _unknown(key, source)
        values[key] = (_absolute(_convert(key, value, source, from_text=isinstance(value, str))), source)
    for key in ("server.listen", "metrics.listen"):
        if key in values:
            value, source = values[key]
            values[key] = (_listen_spelling(key, value, source), source)
    for key, (value, source) in values.items():
        test, expected = CHECKS.get(key, (lambda v: True, ""))
        if value is not None and not test(value):
            raise ConfigError(f"{key}: expected {expected}, got {value!r} ({source})")
    sections = {s: cls(**{k.partition(".")[2]: v for k, (v, _) in values.items() if k.partition(".")[0] == s})
                for s, cls in SECTIONS.items()}
    cfg = Config(**sections, extra=types.MappingProxyType(extra),
                 sources=types.MappingProxyType({k: source for k, (_, source) in values.items()}))
    _cross_checks(cfg)
    return cfg
