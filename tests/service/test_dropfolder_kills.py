"""The drop folder under a real ``kill -9`` at a chosen moment (found by the chaos soak: a daemon
and a sync agent killed at random, dozens of times, while a writer drops images).

A child process takes the drop folder's files and SIGKILLs itself at the chosen system call; the
test then takes the folder again, as the restarted daemon does, and counts the copies: every file
dropped must end once in ``processed/`` or ``quarantine/`` (with its reason), never twice.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from service.dropfolder import QUARANTINE, REASON_SUFFIX, DropFolder
from test_dropfolder_adverse import _other_fs, split_drop

REPO = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from service.dropfolder import DropFolder

    root, victim = Path(sys.argv[1]), sys.argv[2]
    real = os.unlink

    def unlink(path, *a, **k):  # the original's removal, after its copy was renamed into place
        if os.fspath(path) == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *a, **k)

    os.unlink = unlink
    DropFolder(root, lambda *a: None, "move", stable_seconds=0.0).scan_once()
    sys.exit(3)  # not killed: the test's premise is wrong
""")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def test_a_kill_during_a_move_to_quarantine_on_another_file_system_leaves_one_copy(tmp_path: Path) -> None:
    """quarantine/ on a mount of its own (a copy, renamed into place, then the original removed):
    a daemon killed between the rename and the removal found the original again at its restart
    and quarantined it a second time, as ``bad-1.jpg`` with a second reason file, so one bad file
    dropped was two in quarantine (processed/ reused its copy already)."""
    with split_drop(tmp_path) as (root, other):
        (root / "cam").mkdir()
        bad = root / "cam" / "bad.jpg"
        bad.write_bytes(b"not an image")
        child = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(bad)], cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert bad.exists() and _files(other / QUARANTINE) == ["cam/bad.jpg", f"cam/bad.jpg{REASON_SUFFIX}"]

        restarted = DropFolder(root, lambda *a: None, "move", stable_seconds=0.0)
        restarted.scan_once()
        assert not bad.exists()
        # HEAD: [cam/bad-1.jpg, cam/bad-1.jpg.reason.txt, cam/bad.jpg, cam/bad.jpg.reason.txt]
        assert _files(other / QUARANTINE) == ["cam/bad.jpg", f"cam/bad.jpg{REASON_SUFFIX}"]
        assert (other / QUARANTINE / "cam" / "bad.jpg").read_bytes() == b"not an image"
        assert [p.name for p in other.rglob(".*")] == []  # no temporary copy left


def test_another_file_of_the_same_name_in_quarantine_is_not_taken_for_the_copy(tmp_path: Path) -> None:
    """The copy is reused only when it holds the same bytes: a second bad file under a name
    quarantined before still gets a name of its own."""
    with split_drop(tmp_path) as (root, other):
        drop = DropFolder(root, lambda *a: None, "move", stable_seconds=0.0)
        (root / "bad.jpg").write_bytes(b"not an image")
        drop.scan_once()
        (root / "bad.jpg").write_bytes(b"not an image either")
        drop.scan_once()
        assert _files(other / QUARANTINE) == ["bad-1.jpg", f"bad-1.jpg{REASON_SUFFIX}", "bad.jpg",
                                              f"bad.jpg{REASON_SUFFIX}"]
        assert (other / QUARANTINE / "bad-1.jpg").read_bytes() == b"not an image either"


def test_a_second_frame_of_the_same_size_and_time_never_replaces_a_quarantined_one(tmp_path: Path) -> None:
    """Review of the reuse: ``filecmp.cmp`` answered the second comparison from its cache (same
    paths, size and mtime: fixed-size raw frames, a FAT card's 2-second times), and frame B,
    unlike A byte for byte, replaced A's quarantined copy and its reason."""
    from service.dropfolder import write_quarantine

    q = _other_fs(tmp_path) / f"dropfolder-cache-{os.getpid()}-{time.monotonic_ns()}"
    try:
        src = tmp_path / "drop" / "cam" / "frame.raw"
        src.parent.mkdir(parents=True)
        src.write_bytes(b"A" * 4096)
        os.utime(src, (1_700_000_000, 1_700_000_000))
        (q / "cam").mkdir(parents=True)
        shutil.copy2(src, q / "cam" / "frame.raw")  # a kill after the copy, before the unlink
        assert write_quarantine(q, Path("cam/frame.raw"), "bad A", source=src) == q / "cam" / "frame.raw"
        src.write_bytes(b"B" * 4096)
        os.utime(src, (1_700_000_000, 1_700_000_000))
        assert write_quarantine(q, Path("cam/frame.raw"), "bad B", source=src) == q / "cam" / "frame-1.raw"
        assert (q / "cam" / "frame.raw").read_bytes() == b"A" * 4096  # HEAD: B's bytes, A gone
        assert (q / "cam" / "frame-1.raw").read_bytes() == b"B" * 4096
    finally:
        shutil.rmtree(q, ignore_errors=True)
