"""``annotator models list | pull [--once] | rollback | adopt BUNDLE_DIR | clean-registry [--apply]``.

``register(subparsers)`` adds the ``models`` command to the ``annotator`` parser. The daemon
is asked to reload through its ReloadModels RPC at ``--daemon`` / ``[sync.models] daemon``, else
at the config's ``[server] listen`` (as the agent does); where no daemon runs there, or the
daemon picks its port at start, only the ``current`` pointer moves and the daemon picks it up at
its next start (its ``engine.bundle`` should be ``<models root>/current``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from .dataset_cli import add_common_options, settings
from .errors import RetryableError, SyncConfigError
from .pull_settings import PullSettings

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> PullSettings:
    """The pull settings; without ``--daemon`` or ``[sync.models] daemon``, the daemon at the
    config's ``[server] listen`` (as the agent does), which may be down (``args.daemon_optional``):
    a pull or a rollback must also work while the daemon is stopped. (``adopt`` never reloads:
    it installs the first bundle, before the daemon's start.)"""
    s = settings(args, models_root=args.models_root, registry=getattr(args, "registry", None),
                 public_key=getattr(args, "public_key", None), daemon=getattr(args, "daemon", None),
                 margin=getattr(args, "margin", None), min_holdout=getattr(args, "min_holdout", None))
    args.daemon_optional = False
    if s.daemon is None:
        from .config import load_sync_config

        address = load_sync_config(args.config).daemon_address
        if address:
            s, args.daemon_optional = dataclasses.replace(s, daemon=address), True
    return s


def _no_daemon(path: str) -> None:
    log.info("no daemon configured: %s becomes active at the daemon's next start", path)


def bundle_elsewhere(cfg: Any, models_root: Path) -> str | None:
    """Why the bundles installed under ``models_root`` are not the daemon's (``cfg``: a
    ``SyncConfig``): its ``engine.bundle`` names another folder than ``<models root>/current``
    (the demo's config names the shipped bundle); else None. A pull said the new bundle "becomes
    active at the daemon's next start", and the daemon loaded ``engine.bundle`` at every start:
    a retrained bundle was never used (or, reloaded by a running daemon, only until its restart).
    Said by ``models pull``, ``rollback`` and ``adopt``, the agent's start and doctor (WARN)."""
    bundle, current = cfg.daemon_bundle, models_root / "current"
    if bundle is None or Path(bundle).parent.resolve() / Path(bundle).name == current.parent.resolve() / current.name:
        return None
    return (f"engine.bundle is {bundle} ({cfg.daemon_bundle_source}), not {current}: the daemon loads that one "
            f"at each start, so the bundles installed under {models_root} are not used after a restart; set "
            f"engine.bundle = \"{current}\" to run them")


def _say_bundle_elsewhere(args: argparse.Namespace, models_root: Path) -> None:
    from .config import load_sync_config

    problem = bundle_elsewhere(load_sync_config(args.config), models_root)
    if problem:
        sys.stdout.write(f"note: {problem}\n")


def _unless_down(reload_fn: Any, target: str) -> Any:
    """``reload_fn`` where a daemon that is not running (the connection refused) is no error: the
    pointer moves and the daemon loads the bundle at its next start. Any other failure (a TLS
    handshake, a busy or restarting daemon) stays an error: a rollback must not report success
    while a running daemon keeps serving the bundle it refused."""
    import grpc

    def reload(path: str) -> Any:
        try:
            return reload_fn(path)
        except RetryableError as exc:
            cause = exc.__cause__
            if getattr(cause, "code", None) is None or cause.code() != grpc.StatusCode.UNAVAILABLE \
                    or "connection refused" not in str(cause.details()).lower():
                raise
            sys.stdout.write(f"no daemon answers at {target} ([server] listen): {path} becomes active at its next start\n")
            return None

    return reload


def build_puller(s: PullSettings, with_gate: bool = True, daemon_optional: bool = False) -> tuple[Any, list[Any]]:
    """A ``ModelPuller`` for these settings, and the objects to close afterwards. The gate
    (which opens the daemon's store and the dataset) only ``with_gate``; ``daemon_optional``:
    a daemon that is not running is no error (``_unless_down``)."""
    from .config import open_target
    from .models import ModelPuller, ModelSlots, grpc_reload_fn
    from .objectstore import LocalFolderStore
    from .registry import BundleRegistry

    registry = BundleRegistry(open_target(s.registry, "sync.models.registry") if s.registry
                              else LocalFolderStore(s.models_root / "none"))
    slots = ModelSlots(s.models_root)
    reload_fn = grpc_reload_fn(s.daemon, token=s.daemon_token, tls=s.daemon_tls) if s.daemon else _no_daemon
    if s.daemon and daemon_optional:
        reload_fn = _unless_down(reload_fn, s.daemon)
    gate, closing = None, []
    if with_gate:
        from .dataset_cli import _open
        from .gate import GateConfig, ValidationGate

        store, dataset = _open(s)
        gate = ValidationGate(dataset, store.image_path, GateConfig(margin=s.margin, min_images=s.min_holdout),
                              s.models_root / "work")
        closing = [dataset, store]
    return ModelPuller(slots, registry, gate, reload_fn, public_key=s.public_key), closing


def _close(things: list[Any]) -> None:
    for t in things:
        t.close()


def cmd_list(args: argparse.Namespace) -> int:
    from .models import ModelSlots
    from .registry import BundleRegistry

    s = _settings(args)
    slots = ModelSlots(s.models_root)
    cur, prev = slots.current_path(), slots.previous_path()
    out = [f"current   {cur.name if cur else '-'}", f"previous  {prev.name if prev else '-'}",
           f"installed {', '.join(slots.installed()) or '-'}"]
    refused = slots.refused()
    for bid, reason in refused.items():
        out.append(f"refused   {bid}: {reason}")
    missing = registry_problem(s.registry)
    if missing:
        out.append(f"registry  {missing}")
    elif s.registry is not None:
        from .config import open_target

        current = slots.current()
        order = (current.created, current.id) if current else None
        for e in BundleRegistry(open_target(s.registry, "sync.models.registry")).entries():
            mark = "refused" if e.bundle_id in refused else "in use" if current and e.bundle_id == current.id \
                else "newer" if order is None or e.order > order else "older"
            out.append(f"registry  {e.bundle_id}  created {e.created or '?'}  [{mark}]"
                       + (f"  ({e.problem})" if e.problem else ""))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def registry_problem(registry: Any, publishing: bool = False) -> str | None:
    """Why a local registry folder (``[sync.models.registry]`` / ``--registry``, its ``prefix``
    under ``root`` included) cannot be read: it does not exist; else None. It read as an empty
    registry: a mistyped path meant "no newer bundle" for good, said nowhere. ``publishing``:
    this process publishes into it (the agent's ``[sync.training]``), which creates it
    (``sync.publish``; ``annotator train --publish`` too): not a problem then. The agent's start
    and ``annotator doctor`` (``sync.agent.validated_settings``), ``models list``, ``pull`` and
    ``clean-registry`` ask it."""
    if registry is None or publishing or registry.kind != "local" or registry.root is None:
        return None
    folder = Path(registry.root) / registry.prefix.strip("/") if registry.prefix.strip("/") else Path(registry.root)
    if folder.is_dir():
        return None
    return (f"model registry {folder} is not a folder; give --registry the folder bundles are published to, "
            "or fix [sync.models.registry] root" + (" and prefix" if registry.prefix.strip("/") else "")
            + " (annotator train --publish creates it)")


def cmd_pull(args: argparse.Namespace) -> int:
    s = _settings(args)
    if s.registry is None:
        raise SyncConfigError("no model registry: give --registry DIR or [sync.models.registry]")
    missing = registry_problem(s.registry)
    if missing:
        raise SyncConfigError(missing)
    puller, closing = build_puller(s, daemon_optional=args.daemon_optional)
    _say_bundle_elsewhere(args, s.models_root)
    stop = threading.Event()
    idle_said = False  # "no newer bundle" once while nothing changes (it was every poll_interval)
    try:
        while True:
            try:
                result = puller.pull_once()
            except RetryableError as exc:
                if args.once:
                    raise
                log.warning("model pull: %s; trying again in %.0f s", exc, s.poll_interval)
            else:
                for bid, reason in result.refused.items():
                    sys.stdout.write(f"refused {bid}: {reason}\n")
                for bid, gate in result.gate.items():
                    if gate.passed:
                        sys.stdout.write(f"gate {bid}: {gate.reason}\n")
                idle = not (result.switched_to or result.refused or result.gate)
                if not (idle and idle_said):
                    sys.stdout.write(f"switched to {result.switched_to}\n" if result.switched_to
                                     else "no newer bundle accepted; the bundle in use stays" + (
                                         "" if args.once else f" (polling every {s.poll_interval:.0f} s; --once: "
                                         "one pass)") + "\n")
                    sys.stdout.flush()
                idle_said = idle
            if args.once or stop.wait(s.poll_interval):
                return 0
    finally:
        _close(closing)


def cmd_rollback(args: argparse.Namespace) -> int:
    s = _settings(args)
    puller, closing = build_puller(s, with_gate=False, daemon_optional=args.daemon_optional)
    try:
        bid = puller.rollback()
    finally:
        _close(closing)
    sys.stdout.write(f"rolled back to {bid}\n")
    _say_bundle_elsewhere(args, s.models_root)
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    s = _settings(args)
    puller, closing = build_puller(s, with_gate=False)
    try:
        bid = puller.adopt(Path(args.bundle), unsigned=args.unsigned)
    finally:
        _close(closing)
    sys.stdout.write(f"bundle {bid} installed as current under {puller.slots.root}\n")
    _say_bundle_elsewhere(args, s.models_root)
    return 0


def cmd_clean_registry(args: argparse.Namespace) -> int:
    """List (and with ``--apply`` delete) the registry's bundle folders that no bundle.json names
    and whose newest object is older than ``--min-age-hours`` (``BundleRegistry.orphans``), and
    abort the multipart uploads killed publications left in folders as old
    (``BundleRegistry.abandoned_uploads``: S3 bills their parts for ever otherwise)."""
    from .config import open_target
    from .registry import BundleRegistry

    s = settings(args, registry=args.registry)
    if s.registry is None:
        raise SyncConfigError("no model registry: give --registry DIR or [sync.models.registry]")
    missing = registry_problem(s.registry)
    if missing:
        raise SyncConfigError(missing)
    if args.min_age_hours < 1:
        raise SyncConfigError(f"--min-age-hours: expected at least 1 (a publication may be running), "
                              f"got {args.min_age_hours}")
    min_age = args.min_age_hours * 3600.0
    registry = BundleRegistry(open_target(s.registry, "sync.models.registry"))
    found = registry.orphans(0.0)
    orphans = [o for o in found if o.newest_age_s >= min_age]
    for o in found:
        if o.newest_age_s < min_age:
            sys.stdout.write(f"left  bundles/{o.bundle_id}/  {len(o.keys)} objects, no bundle.json yet, newest "
                             f"{o.newest_age_s / 3600:.1f} h old (a publication may be running)\n")
    for o in orphans:
        what = (f"bundles/{o.bundle_id}/  {len(o.keys)} objects, {o.size / 1e6:.1f} MB, no bundle.json, "
                f"newest {o.newest_age_s / 3600:.0f} h old")
        if args.apply:
            done = registry.remove_orphan(o, min_age)
            sys.stdout.write(f"{'removed' if done else 'left (changed since)'}  {what}\n")
        else:
            sys.stdout.write(f"would remove  {what}\n")
    pending = registry.abandoned_uploads(0.0)
    uploads = [u for u in pending if u.age_s >= min_age]
    for u in pending:
        if u.age_s < min_age:
            sys.stdout.write(f"left  {u.key}  multipart upload, its folder written {u.age_s / 3600:.1f} h ago "
                             "(a publication may be running)\n")
    for u in uploads:
        what = f"{u.key}  multipart upload, {u.size / 1e6:.1f} MB in parts, its folder written {u.age_s / 3600:.0f} h ago"
        if args.apply:
            sys.stdout.write(f"{'aborted' if registry.abort_upload(u, min_age) else 'left (changed since)'}  {what}\n")
        else:
            sys.stdout.write(f"would abort  {what}\n")
    if not orphans and not uploads:
        sys.stdout.write("nothing to remove\n" if found or pending else "no interrupted publication in the registry\n")
    elif not args.apply:
        sys.stdout.write(f"{len(orphans)} folder(s) and {len(uploads)} unfinished upload(s) of interrupted "
                         "publications; run again with --apply to remove them (not while one of these bundles is "
                         "being published again)\n")
    return 0


def register(subparsers: Any) -> None:
    """Add ``models list|pull|rollback|adopt|clean-registry`` to an argparse subparsers object."""
    p = subparsers.add_parser("models", help="model bundles: list, pull from the registry, roll back")
    sub = p.add_subparsers(dest="models_command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        add_common_options(s)
        s.add_argument("--models-root", type=Path, default=None, help="default <store root>/models")
        s.add_argument("--registry", type=Path, default=None, help="a registry folder (overrides the config)")
        s.add_argument("--daemon", default=None, help="host:port of the daemon to send ReloadModels to "
                       "(default [sync.models] daemon, else [server] listen when a daemon answers there)")

    s = sub.add_parser("list", help="the bundle in use, the previous one, refusals, the registry's bundles")
    common(s)
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("pull", help="verify, gate and switch to newer bundles from the registry")
    common(s)
    s.add_argument("--once", action="store_true", help="one pass, then exit (default: keep polling)")
    s.add_argument("--public-key", type=Path, default=None, help="ed25519 public key; bundles must be signed")
    s.add_argument("--margin", type=float, default=None, help="how much worse a candidate may score")
    s.add_argument("--min-holdout", type=int, default=None, help="fewest hold-out images for a quality check")
    s.set_defaults(func=cmd_pull)
    s = sub.add_parser("rollback", help="switch back to the previous bundle (the current one is refused for good)")
    common(s)
    s.set_defaults(func=cmd_rollback)
    s = sub.add_parser("adopt", help="install a local bundle as the current one (first start)")
    common(s)
    s.add_argument("bundle", help="bundle directory")
    s.add_argument("--public-key", type=Path, default=None,
                   help="ed25519 public key; the bundle must be signed (default [sync.models] public_key)")
    s.add_argument("--unsigned", action="store_true",
                   help="install it even though a public key is set and the bundle carries no valid signature")
    s.set_defaults(func=cmd_adopt)
    s = sub.add_parser("clean-registry", help="remove what publications killed before bundle.json left in the "
                       "registry: folders, unfinished multipart uploads (a dry run unless --apply)")
    add_common_options(s)
    s.add_argument("--registry", type=Path, default=None, help="a registry folder (overrides the config)")
    s.add_argument("--min-age-hours", type=float, default=24.0,
                   help="only folders whose newest object is at least this old (default 24)")
    s.add_argument("--apply", action="store_true", help="delete them (default: only list them)")
    s.set_defaults(func=cmd_clean_registry)
