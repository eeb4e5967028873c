"""systemd's notify protocol (``sd_notify``) without libsystemd: readiness, status, watchdog.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started; with
``WatchdogSec=`` it restarts the unit when no ``WATCHDOG=1`` arrives within that interval.
Both travel as one datagram per message to the unix socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace). Outside systemd the variable is unset and
every call is a cheap no-op that returns False, so the daemon can call them unconditionally.

Use from a main loop::

    notifier = Notifier.from_environ(os.environ)
    watchdog = Watchdog.from_environ(os.environ, healthy=lambda: daemon.is_healthy(), notifier=notifier)
    notifier.ready(); watchdog.start()
    ...
    notifier.stopping(); watchdog.stop()

A long piece of start-up (the store's upgrade of an old layout) asks for more time than
``TimeoutStartSec`` while it runs: ``with Extender(notifier, status=...)``.

The watchdog pings only while ``healthy()`` returns True: a wedged daemon stops pinging and
systemd restarts it, which is the point of a watchdog (a thread that pings regardless would
hide the hang).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
# ``Extender``: how often it asks systemd for more time; each request is for three of these.
EXTEND_EVERY_S = 20.0
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(name: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as a socket address: ``@x`` -> abstract namespace (leading NUL)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notify messages to one socket; ``socket_name`` None or empty makes it a no-op."""

    def __init__(self, socket_name: str | None) -> None:
        self.socket_name = socket_name or None
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, env: Mapping[str, str] = os.environ) -> "Notifier":
        return cls(env.get(NOTIFY_SOCKET))

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. ``"READY=1"`` or several ``KEY=VALUE`` lines); True when sent.

        Failures are logged, never raised: a notify problem must not take the daemon down.
        """
        if self.socket_name is None:
            return False
        if not state:
            raise ValueError("state: expected at least one KEY=VALUE line, got an empty string")
        try:
            with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_address(self.socket_name))
                sock.sendall(state.encode())
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.socket_name, exc)
            return False

    def ready(self) -> bool:
        """Start-up finished: systemd marks a ``Type=notify`` unit active."""
        return self.notify(f"READY=1\nMAINPID={os.getpid()}")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status`` (newlines are folded to spaces)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog_ping(self) -> bool:
        return self.notify("WATCHDOG=1")


def notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """``sd_notify(0, state)``: send to ``$NOTIFY_SOCKET`` of ``env``; False when unset or failed."""
    return Notifier.from_environ(env).notify(state)


def ready(env: Mapping[str, str] = os.environ) -> bool:
    return Notifier.from_environ(env).ready()


def stopping(env: Mapping[str, str] = os.environ) -> bool:
    return Notifier.from_environ(env).stopping()


def status(text: str, env: Mapping[str, str] = os.environ) -> bool:
    return Notifier.from_environ(env).status(text)


def watchdog_ping(env: Mapping[str, str] = os.environ) -> bool:
    return Notifier.from_environ(env).watchdog_ping()


def watchdog_interval(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds of the watchdog timeout systemd set for this process, or None when none applies.

    ``WATCHDOG_USEC`` is microseconds; when ``WATCHDOG_PID`` is set and is not ``pid`` (this
    process by default) the watchdog belongs to another process (e.g. the parent that forked
    us) and None is returned.
    """
    usec = env.get(WATCHDOG_USEC, "").strip()
    if not usec:
        return None
    owner = env.get(WATCHDOG_PID, "").strip()
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("%s=%r is not an integer; watchdog disabled", WATCHDOG_USEC, usec)
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval / 2`` seconds from a thread while ``healthy()`` is True.

    ``interval`` is systemd's timeout in seconds (``watchdog_interval``); None or a notifier
    without a socket makes ``start`` a no-op. An unhealthy check, or one that raises, skips the
    ping (and is logged once per change), so systemd notices the hang and restarts the unit.
    """

    def __init__(self, notifier: Notifier, interval: float | None, healthy: Callable[[], bool] = lambda: True) -> None:
        if interval is not None and interval <= 0:
            raise ValueError(f"interval: expected seconds > 0 or None, got {interval}")
        self.notifier, self.interval, self.healthy = notifier, interval, healthy
        self.pings = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    @classmethod
    def from_environ(cls, env: Mapping[str, str] = os.environ, healthy: Callable[[], bool] = lambda: True,
                     notifier: Notifier | None = None) -> "Watchdog":
        return cls(notifier or Notifier.from_environ(env), watchdog_interval(env), healthy)

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def _check(self) -> bool:
        try:
            ok = bool(self.healthy())
        except Exception:  # a failing health check means "unhealthy", whatever it raised
            log.exception("watchdog health check raised")
            ok = False
        if ok != self._was_healthy:
            (log.info if ok else log.warning)("watchdog: daemon %s; pings %s", "healthy" if ok else "unhealthy",
                                             "resume" if ok else "withheld")
            self._was_healthy = ok
        return ok

    def beat(self) -> bool:
        """One check-and-ping; True when a ping was sent."""
        if self._check() and self.notifier.watchdog_ping():
            self.pings += 1
            return True
        return False

    def _run(self) -> None:
        assert self.interval is not None
        period = self.interval / 2
        while True:
            self.beat()
            if self._stop.wait(period):
                return

    def start(self) -> bool:
        """Start the pinging thread; False (and nothing started) when no watchdog is configured."""
        if not self.enabled or self._thread is not None:
            return False
        log.info("systemd watchdog: %.1f s timeout, pinging every %.1f s", self.interval, self.interval / 2)  # type: ignore[operator]
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class Extender:
    """Asks systemd for more time while a long piece of start-up runs: ``EXTEND_TIMEOUT_USEC``
    (three periods of ``EXTEND_EVERY_S``) with a ``STATUS`` line from ``status()``, at ``start``
    and then every period from a thread, until ``stop`` (``with`` stops it at the end; ``start``
    again is a no-op). A ``Type=notify`` unit that has not sent READY=1 by ``TimeoutStartSec`` is
    killed: the upgrade of a large old store on a slow card took longer, and as one of its steps
    (an index) took longer by itself the restarted unit never got further. From a thread, not
    from the work: one SQLite statement may take minutes. Past ``TimeoutStartSec`` the unit
    then fails only when the requests stop (the process died, or hangs as a whole). Without
    ``$NOTIFY_SOCKET`` a no-op; once the unit runs (READY=1 sent) systemd reads it against
    ``RuntimeMaxSec``, which is unset (no limit) in the shipped units.

    ``extend()`` False sends the ``STATUS`` alone, so that systemd's own timeout applies: a unit
    waiting for another program's upgrade while that program is stopped (Ctrl-Z in a terminal)
    was given more time for as long as it stayed stopped, for ever."""

    def __init__(self, notifier: Notifier, status: Callable[[], str],
                 extend: Callable[[], bool] = lambda: True) -> None:
        self.notifier, self.status, self.extend = notifier, status, extend
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _send(self) -> None:
        more = f"EXTEND_TIMEOUT_USEC={int(EXTEND_EVERY_S * 3e6)}\n" if self.extend() else ""
        self.notifier.notify(f"{more}STATUS=" + " ".join(self.status().splitlines()))

    def _run(self) -> None:
        while not self._stop.wait(EXTEND_EVERY_S):
            self._send()

    def start(self) -> None:
        if not self.notifier.enabled or self._thread is not None:
            return
        self._send()
        self._thread = threading.Thread(target=self._run, name="sd-extend", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop asking; a last ``STATUS`` says where it ended (``status()``)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(5.0)
        self._thread = None
        self.notifier.status(self.status())

    def __enter__(self) -> "Extender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
