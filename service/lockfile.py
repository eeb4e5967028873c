"""One process per role on a store: an exclusive ``flock`` on a file in the store root.

``hold(path)`` takes the lock without waiting and writes this process's pid into the file (for
the message a second process gives); it returns the file descriptor, whose ``os.close`` releases
it. The kernel drops the lock when its holder dies, kill -9 included, so a file left behind
(with a dead pid in it) never blocks anyone. ``Held`` says another process holds it, with that
process's pid ("?" when unknown): the kernel's own record of the lock (``/proc/locks``) where it
has one, else what the file says. A lock file made by root (``annotator serve`` run once with
sudo) cannot be written by the service user, who holds it all the same (flock needs no write)
but could not put its pid there: the message named root's long-gone process. One made
unreadable too (``sudo`` with umask 077) cannot be opened at all: while a process holds it (by
the kernel's record) that is ``Held``, else ``Unopenable`` names its owner and mode and says how
to fix it, for every role alike. A lock file ``hold`` makes is readable by all (whatever the
umask), so that another user's program can wait on it.

``release(fd, path)`` removes the file as it lets go (the store's upgrade lock, held once after
an upgrade: left behind it looked like an upgrade still running). That is safe because ``hold``
checks, once it has the lock, that the file it locked is still the one the path names: a
process that opened the file just before it was removed, and locked it once it was let go,
would otherwise hold a lock on a file nobody else can find, beside the next holder of a new one.

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
from dataclasses import dataclass
from pathlib import Path


class Held(Exception):
    """Another process holds the lock file ``path``; ``pid`` is what it wrote there, ``note`` the
    line it wrote after the pid (``note``: what it is doing; "" when none)."""

    def __init__(self, path: Path, pid: str, note: str = "", known: bool = False) -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path, self.pid, self.note = path, pid, note
        # The pid is the kernel's (``/proc/locks``): that process, alive now, in this pid namespace,
        # which ``process`` may look at (a pid read from the file may be another namespace's).
        self.known = known


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
    ``Unopenable`` when another user's lock file is unreadable to this one and nobody holds it,
    ``PermissionError`` when there is none and this user may not create it."""
    while True:
        fd, writable = _open(Path(path))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            first, _, rest = os.pread(fd, 512, 0).decode("utf-8", "replace").partition("\n")
            known = _holder(os.fstat(fd))
            pid = known or first.strip() or "?"
            os.close(fd)
            # The note only when it is the holder's: one who may not write the file left another's there.
            raise Held(Path(path), pid, rest.partition("\n")[0].strip() if pid == first.strip() else "",
                       known is not None) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_path(fd, path):
            break
        os.close(fd)  # removed by its holder (``release``) while this one waited for it: lock the path's
    if writable:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:  # the pid is only for the message; the lock is held
            pass
    return fd


def _open(path: Path) -> tuple[int, bool]:
    """A descriptor on the lock file ``path`` and whether it is writable (see ``hold``)."""
    while True:
        try:
            return os.open(path, os.O_RDWR), True
        except FileNotFoundError:
            pass
        except PermissionError:  # made by another user (root ran the command once): flock needs no write
            try:
                return os.open(path, os.O_RDONLY), False
            except FileNotFoundError:  # removed meanwhile (``release``)
                continue
            except PermissionError as unreadable:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                except OSError:
                    raise unreadable from None
                holder = _holder(st)
                if holder is not None:  # that user's program runs: wait for it as for any other
                    raise Held(path, holder, "", True) from None
                if not _same(st, path):  # let go of and removed (``release``) since the stat: look again
                    continue
                raise Unopenable(path, unreadable.strerror, st.st_uid, stat.S_IMODE(st.st_mode)) from None
        try:  # PermissionError: a folder this user may not write, and no lock file in it yet
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not os.path.islink(path):
                continue  # made by another meanwhile: open that one
            # A link to a lock file not made yet (into /run, which a boot empties): O_EXCL never
            # follows a link, and this looped for ever at full CPU; made through it, as before.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:  # readable by every user whatever the umask (077 under sudo), so that theirs can wait on it
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o444)
        except OSError:
            pass
        return fd, True


def _is_path(fd: int, path: Path) -> bool:
    """Whether ``path`` names the file open on ``fd`` (not removed, nor replaced)."""
    return _same(os.fstat(fd), path)


def _same(st: os.stat_result, path: Path) -> bool:
    """Whether ``path`` names the file ``st`` describes."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def release(fd: int, path: Path) -> None:
    """Remove the lock file ``path`` held on ``fd`` (``hold``), then let go of it. Best effort: a
    file this user may not remove (a folder of another user's) stays, and is harmless."""
    try:
        if _is_path(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _holder(st: os.stat_result) -> str | None:
    """The pid of the process holding a ``flock`` on the file ``st`` describes, from ``/proc/locks``
    (Linux; lines like ``1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF``), or None where it does
    not say (nobody holds it, another system, a holder in another pid namespace: pid 0)."""
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


STOPPED = {"T": "stopped (Ctrl-Z in its terminal, or kill -STOP)", "t": "stopped by a debugger or tracer"}


@dataclass(frozen=True)
class Process:
    """What ``/proc/<pid>`` says of a lock's holder: ``state`` (R running, S sleeping, D waiting on
    its storage, T/t stopped: ``STOPPED``), ``command`` (its command line, cut to 120
    characters) and ``cpu_s`` (CPU seconds it used so far)."""

    state: str
    command: str
    cpu_s: float


def process(pid: str) -> Process | None:
    """``Process`` for ``pid`` (a ``Held.known`` one), or None where ``/proc`` does not say (gone)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            comm, _, rest = f.read().decode("utf-8", "replace").rpartition(")")
        fields = rest.split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        try:
            with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
                command = " ".join(f.read().decode("utf-8", "replace").replace("\0", " ").split())
        except OSError:
            command = ""
    except (OSError, ValueError, IndexError):
        return None
    command = command or comm.partition("(")[2]
    return Process(fields[0], command if len(command) <= 120 else command[:117] + "...", cpu)
