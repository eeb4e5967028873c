"""Operator subcommands of ``annotator``: ``doctor``, ``status`` and ``healthcheck``.

``service.cli.build_parser`` adds them with one line, ``ops_cli.register(sub)``. Exit codes:
doctor 0 when nothing FAILs (warnings allowed), 1 otherwise; status 0, or 1 with one line when
the daemon cannot be reached; healthcheck 0 when SERVING, else 1 (the container HEALTHCHECK).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .client import TlsOptions

log = logging.getLogger(__name__)
DEFAULT_SERVER = "127.0.0.1:50051"


def _tls(args: argparse.Namespace) -> "TlsOptions | None":
    """``TlsOptions`` from --ca/--cert/--key, or None for a plain connection."""
    from .client import TlsOptions

    if not (args.ca or args.cert or args.key):
        return None
    if bool(args.cert) != bool(args.key):
        raise ConfigError("--cert and --key go together (a client certificate and its key)")

    def read(p: str | None) -> bytes | None:
        try:
            return Path(p).read_bytes() if p else None
        except OSError as exc:
            raise ConfigError(f"cannot read {p}: {exc.strerror}") from exc

    return TlsOptions(root_certificates=read(args.ca), client_cert=read(args.cert), client_key=read(args.key),
                      server_name=args.server_name)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import exit_code, format_report, run_checks

    checks = run_checks(Path(args.config) if args.config else None, os.environ)
    print(format_report(checks))
    return exit_code(checks)


def _daemon_of(args: argparse.Namespace) -> tuple[str, str | None]:
    """The daemon to ask (--server, else the ``[server] listen`` of --config / $ANNOTATOR_CONFIG
    with a wildcard host as loopback, else 127.0.0.1:50051) and the config's ``[server] token``.
    Only --server was read before: a daemon on the port its config names was "not running"."""
    if args.server or not args.config:
        return args.server or DEFAULT_SERVER, None
    from .config import load_config

    s = load_config(Path(args.config), env=os.environ).server
    host, _, port = s.listen.rpartition(":")
    if port in ("", "0"):
        raise ConfigError(f"{args.config}: [server] listen = {s.listen!r} picks its port at start: "
                          "give --server 127.0.0.1:PORT with the port the daemon logged")
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}", s.token


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from .client import AnnotatorClient
    from .status_view import format_status

    server, config_token = _daemon_of(args)
    token = args.token or os.environ.get("ANNOTATOR_TOKEN") or config_token
    tls = _tls(args)
    if tls is None and args.config and not args.server:  # --server: another daemon, maybe plain gRPC
        tls = _tls_from_config(args.config, args.server_name)
    with AnnotatorClient(server, timeout=args.timeout, retries=0, tls=tls, token=token) as client:
        try:
            status = client.status()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            running = ("is the daemon running? (systemctl status annotator)" if args.server or args.config else
                       "is the daemon running? (systemctl status annotator); a daemon on another port: "
                       "give --config F (its [server] listen) or --server HOST:PORT")
            hint = {"UNAVAILABLE": running,
                    "UNAUTHENTICATED": "give --token or set ANNOTATOR_TOKEN"}.get(getattr(code, "name", ""), "")
            print(f"annotator status: {server}: {getattr(code, 'name', code)}: {details}"
                  + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 1
    print(format_status(status, server))
    return 0


def _tls_from_config(path: str, server_name: str | None) -> "TlsOptions | None":
    """TLS for a health check of the daemon that ``path`` (and ANNOTATOR_* variables) configures,
    when it serves TLS (``TlsOptions.for_own_server``); None when it serves plain gRPC."""
    from .client import TlsOptions
    from .config import load_config

    s = load_config(Path(path), env=os.environ).server
    if not (s.tls_cert and s.tls_key):
        return None
    try:
        return TlsOptions.for_own_server(s.tls_cert, s.tls_key, s.tls_client_ca, server_name)
    except OSError as exc:
        raise ConfigError(f"cannot read the daemon's TLS files: {exc}") from exc


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from .status_view import health_check

    server, _ = _daemon_of(args)
    tls = _tls(args)
    if tls is None and args.config:
        tls = _tls_from_config(args.config, args.server_name)
    ok, line = health_check(server, args.service, args.timeout, tls=tls)
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _connection_args(s: argparse.ArgumentParser, timeout: float) -> None:
    s.add_argument("--server", default=DEFAULT_SERVER, help=f"HOST:PORT of the daemon (default {DEFAULT_SERVER})")
    s.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default {timeout:g})")
    s.add_argument("--ca", help="PEM of the CA that signed the server certificate (TLS)")
    s.add_argument("--cert", help="client certificate PEM (mutual TLS)")
    s.add_argument("--key", help="client key PEM (mutual TLS)")
    s.add_argument("--server-name", help="expected TLS host name when it differs from HOST")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add doctor, status and healthcheck to the ``annotator`` subparsers."""
    s = sub.add_parser("doctor", help="check config, folders, disk, bundle, providers, S3, review backend, clock")
    s.add_argument("--config", help="TOML file (default: $ANNOTATOR_CONFIG)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("status", help="show a running daemon's bundle, queues, counters and uptime")
    _connection_args(s, 5.0)
    s.set_defaults(server=None)  # None: from --config, else the default
    s.add_argument("--config", default=os.environ.get("ANNOTATOR_CONFIG"),
                   help="the daemon's TOML (default: $ANNOTATOR_CONFIG): ask the daemon at its [server] listen "
                        "(with its token and TLS) when no --server is given")
    s.add_argument("--token", help="bearer token (default: $ANNOTATOR_TOKEN, else the config's [server] token)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("healthcheck", help="exit 0 when the daemon's gRPC health says SERVING, else 1")
    _connection_args(s, 3.0)
    s.set_defaults(server=None)  # None: the [server] listen of --config, else the default
    s.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    s.add_argument("--config", default=os.environ.get("ANNOTATOR_CONFIG"),
                   help="the daemon's TOML (default: $ANNOTATOR_CONFIG): check its [server] listen when no "
                        "--server is given, and when it serves TLS and no --ca is given, over TLS with its own "
                        "certificate (the container's HEALTHCHECK)")
    s.set_defaults(func=cmd_healthcheck)
