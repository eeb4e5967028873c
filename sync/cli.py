"""``annotator sync``: command-line entry of the sync agent.

``register(subparsers)`` adds the subcommand to the ``annotator`` parser (service.cli wires it
in); ``python -m sync.cli sync ...`` runs it on its own. Exit codes: 0 done or stopped, 1 ``--once`` left work
behind after transient failures (the next run resumes it), 2 a
problem the user must fix (configuration, credentials, missing bucket), printed as one line.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import PermanentError, SyncConfigError

log = logging.getLogger("annotator.sync")


def cmd_sync(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM (or, with ``--once``, until there is no work left)."""
    from .agent import build_agent
    from .config import load_sync_config

    try:
        cfg = load_sync_config(Path(args.config) if args.config else None)
        agent = build_agent(cfg)
        agent.install_signal_handlers()
        log.info("sync agent for %s: store %s, target %s", cfg.appliance_id, cfg.store_root, cfg.target.kind)
        agent.run(once=args.once)
        if args.once and agent.last_error is not None:
            sys.stderr.write(f"annotator sync: work left for later: {agent.last_error}\n")
            return 1
    except (SyncConfigError, PermanentError) as exc:
        sys.stderr.write(f"annotator sync: {exc}\n")
        return 2
    return 0


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
