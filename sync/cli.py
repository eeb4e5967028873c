"""``annotator sync``: command-line entry of the sync agent.

``register(subparsers)`` adds the subcommand to the ``annotator`` parser (service.cli wires it
in); ``python -m sync.cli sync ...`` runs it on its own. Exit codes: 0 done or stopped, 1 ``--once`` left work
behind after transient failures (the next run resumes it), 2 a
problem the user must fix (configuration, credentials, missing bucket), printed as one line.

Under systemd (``Type=notify``, ``deploy/systemd/annotator-sync.service``) the agent sends
``READY=1`` once its tasks are built (store open, settings valid), a ``STATUS=`` line after
each pass that did work, ``WATCHDOG=1`` while its loop is alive, and ``STOPPING=1`` at exit.
With ``[sync] metrics_listen`` it serves Prometheus metrics (uploads, retries, merged reviews,
images per state) at ``http://host:port/metrics``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import PermanentError, SyncConfigError

if TYPE_CHECKING:
    from service.systemd import Notifier

    from .agent import Agent

log = logging.getLogger("annotator.sync")


def cmd_sync(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM (or, with ``--once``, until there is no work left)."""
    from service.systemd import Notifier, Watchdog

    from .agent import build_agent
    from .config import at, load_sync_config

    notifier = Notifier.from_environ(os.environ)
    watchdog: Watchdog | None = None
    try:
        cfg = load_sync_config(Path(args.config) if args.config else None)
        metrics = None
        if cfg.metrics_listen is not None:
            from service.metrics import MetricsRecorder

            metrics = MetricsRecorder(process="sync")  # the daemon's series are on its own endpoint
        try:
            agent = build_agent(cfg, metrics=metrics)
        except sqlite3.OperationalError as exc:  # the store (or the agent's journal) this user may not write
            from service.sqlite import open_failure

            raise SyncConfigError(open_failure("store", cfg.store_root, exc)) from exc
        if metrics is not None and cfg.metrics_listen is not None:
            from service.metrics import start_metrics_server

            try:
                start_metrics_server(metrics, *cfg.metrics_listen)
            except OSError as exc:
                agent.close()
                raise SyncConfigError(f"sync.metrics_listen{at(cfg.source)}: cannot listen on {cfg.metrics_listen[0]}:"
                                      f"{cfg.metrics_listen[1]}: {exc}") from exc
        agent.install_signal_handlers()
        agent.on_pass = _status_reporter(notifier, agent)
        watchdog = Watchdog.from_environ(os.environ, healthy=agent.healthy, notifier=notifier)
        log.info("sync agent for %s: store %s, target %s", cfg.appliance_id, cfg.store_root, cfg.target.kind)
        notifier.ready()
        notifier.status(f"running: {', '.join(t.name for t in agent.tasks)}")
        watchdog.start()
        agent.run(once=args.once)
        if args.once and agent.last_error is not None and not agent.stop.is_set():
            sys.stderr.write(f"annotator sync: work left for later: {agent.last_error}\n")
            return 1
    except (SyncConfigError, PermanentError) as exc:
        sys.stderr.write(f"annotator sync: {exc}\n")
        return 2
    finally:
        notifier.stopping()
        if watchdog is not None:
            watchdog.stop()
    return 0


def _status_reporter(notifier: "Notifier", agent: "Agent") -> "Callable[[bool], None]":
    """``on_pass`` for the agent: a systemd STATUS line after passes that did work or failed."""
    def report(did: bool) -> None:
        if agent.last_error is not None:
            notifier.status(f"waiting to retry: {agent.last_error}"[:200])
        elif did:
            notifier.status("working")
        else:
            notifier.status(f"idle; next pass in {agent.poll_interval:g} s")

    return report


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add ``sync`` to an ``annotator`` subparsers object; the handler is in ``func``."""
    s = subparsers.add_parser("sync", help="upload review-pending images and run the other sync tasks")
    s.add_argument("--config", help="the appliance's TOML file (its [store] and [sync] tables); "
                                    "default $ANNOTATOR_CONFIG")
    s.add_argument("--once", action="store_true", help="stop when there is nothing left to do")
    s.set_defaults(func=cmd_sync)
    return s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sync.cli")
    parser.add_argument("--log-level", default="INFO")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
