"""One process per role on a store: an exclusive ``flock`` on a file in the store root.

``hold(path)`` takes the lock without waiting and writes this process's pid into the file (for
the message a second process gives); it returns the file descriptor, whose ``os.close`` releases
it. The kernel drops the lock when its holder dies, kill -9 included, so a file left behind
(with a dead pid in it) never blocks anyone. ``Held`` says another process holds it, with that
process's pid ("?" when unknown): the kernel's own record of the lock (``/proc/locks``) where it
has one, else what the file says. A lock file made by root (``annotator serve`` run once with
sudo) cannot be written by the service user, who holds it all the same (flock needs no write)
but could not put its pid there: the message named root's long-gone process. One made
unreadable too (``sudo`` with umask 077) cannot be opened at all: ``Unopenable`` names its owner
and mode and says how to fix it, for both roles alike.

Used by ``annotator serve`` (``serve.lock``: one daemon per store, which the judge's budgets and
near-duplicate memory need) and the sync agent (``sync.lock``: one agent per store and journal),
as ``sync.models`` does for the models folder (``models/.lock``), and by the store while it
brings an old layout up to date (``upgrade.lock``, ``service.store``), whose holder says there
which step it is on (``note``) for the programs that wait for it.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path


class Held(Exception):
    """Another process holds the lock file ``path``; ``pid`` is what it wrote there, ``note`` the
    line it wrote after the pid (``note``: what it is doing; "" when none)."""

    def __init__(self, path: Path, pid: str, note: str = "") -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path, self.pid, self.note = path, pid, note


class Unopenable(PermissionError):
    """This user may not open the lock file ``path``, which another user made (owner, mode)."""

    def __init__(self, path: Path, reason: str, uid: int, mode: int) -> None:
        self.path, self.reason, self.owner, self.mode = path, reason, _user(uid), mode
        super().__init__(f"this user may not open {path} ({reason}; it belongs to {self.owner}, mode {mode:o}, "
                         "made by a command run as that user)")

    def advice(self, role: str) -> str:
        """The message and its fix, with ``role`` the process the lock is for ("daemon", "agent")."""
        me = _user(os.getuid())
        return (f"{self}: with no {role} running, remove it (sudo rm {self.path}) or give it to {me} "
                f"(sudo chown {me} {self.path})")


def _user(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def hold(path: Path) -> int:
    """Lock ``path`` (created when missing) for this process; ``Held`` at once when another has it,
    ``Unopenable`` when another user's lock file is unreadable to this one, ``PermissionError`` when
    there is none and this user may not create it."""
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError as denied:  # made by another user (root ran the command once): flock needs no write
        try:
            fd, writable = os.open(path, os.O_RDONLY), False
        except FileNotFoundError:  # a folder this user may not write, and no lock file in it yet
            raise denied from None
        except PermissionError as unreadable:
            try:
                st = os.stat(path)
            except OSError:
                raise unreadable from None
            raise Unopenable(Path(path), unreadable.strerror, st.st_uid, stat.S_IMODE(st.st_mode)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        first, _, rest = os.pread(fd, 512, 0).decode("utf-8", "replace").partition("\n")
        pid = _holder(fd) or first.strip() or "?"
        os.close(fd)
        # The note only when it is the holder's: one who may not write the file left another's there.
        raise Held(Path(path), pid, rest.partition("\n")[0].strip() if pid == first.strip() else "") from None
    except BaseException:
        os.close(fd)
        raise
    if writable:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:  # the pid is only for the message; the lock is held
            pass
    return fd


def note(fd: int, text: str) -> None:
    """Write ``text`` (one line) after the pid in the lock file this process holds on ``fd``: what
    it is doing, which ``Held.note`` gives the processes that find it held. Written before the
    old text is cut off, so that a reader never finds the file empty; best effort, as the pid."""
    data = f"{os.getpid()}\n{' '.join(text.splitlines())}\n".encode()
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError:  # a lock file this user may not write (``hold``): the lock is held all the same
        pass


def _holder(fd: int) -> str | None:
    """The pid of the process holding a ``flock`` on ``fd``'s file, from ``/proc/locks`` (Linux;
    lines like ``1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF``), or None where it does not
    say (another system, a holder in another pid namespace: pid 0)."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", "rb") as f:
            for raw in f:
                fields = raw.decode("ascii", "replace").split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4] != "0":
                    return fields[4]  # a waiter's line ("-> FLOCK ...") has its fields one further on
    except OSError:
        pass
    return None
