"""Power cuts, not kills: what the drop folder hands over must be on disk before the original goes.

A kill -9 keeps everything the kernel was handed; a power cut keeps only what was fsynced, and two
file systems (``processed/`` or ``quarantine/`` a mount of their own) commit each on its own. So a
cross-file-system move must fsync the copy AND the folder it was renamed into before the original
is removed. Two ways to check it:

- the order of the calls, recorded in the process (``os.fsync``, ``os.replace``, ``os.unlink``
  wrapped), for ``processed/`` and ``quarantine/`` on /dev/shm;
- a real power cut: two ext4 file systems on loop devices, cut with ``EXT4_IOC_SHUTDOWN`` and
  ``NOLOGFLUSH`` (what xfstests' ``godown`` does: the journal is not written, what reached the
  disk stays), then mounted again. Needs root, ``losetup``, ``mkfs.ext4`` and ``mount``; skipped
  otherwise. Before the fix the original was gone and the copy was only the hidden temporary file
  (``processed/cam1/.img0.jpg.<random>.tmp``), a quarantined file likewise.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import service.durable as durable
from service.dropfolder import PROCESSED, QUARANTINE, REASON_SUFFIX, DropFolder, write_quarantine
from service.store import Store
from test_dropfolder_adverse import _jpeg, split_drop


@contextlib.contextmanager
def _recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """Record (call, path) of every fsync, rename and unlink in this process; fsync's path is read
    back from its descriptor."""
    calls: list[tuple[str, str]] = []
    fsync, replace, unlink = os.fsync, os.replace, os.unlink

    def rec_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def rec_replace(a, b, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        calls.append(("rename", os.path.realpath(os.path.dirname(os.fspath(b))) + "/" + os.path.basename(b)))
        replace(a, b, *args, **kw)

    def rec_unlink(p, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        calls.append(("unlink", os.path.realpath(os.fspath(p))))
        unlink(p, *args, **kw)

    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "replace", rec_replace)
    monkeypatch.setattr(os, "unlink", rec_unlink)
    yield calls


def _index(calls: list[tuple[str, str]], call: str, path: Path | str) -> int:
    want = (call, os.path.realpath(path))
    assert want in calls, f"no {call} of {path} in {calls}"
    return calls.index(want)


def test_a_move_to_another_file_system_syncs_the_copy_and_its_folders_before_the_original_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """processed/ on another file system: the copy fsynced, renamed, its folder fsynced, and the
    folder made for it (processed/cam1) fsynced in its parent, all before the unlink of the
    original. HEAD: the unlink came right after the rename, no folder fsynced."""
    with split_drop(tmp_path) as (root, other):
        (root / "cam1").mkdir()
        original = root / "cam1" / "img0.jpg"
        original.write_bytes(_jpeg(1))
        original = Path(os.path.realpath(original))
        drop = DropFolder(root, lambda *a: None, "move", stable_seconds=0.0)
        with _recorded(monkeypatch) as calls:
            assert drop.scan_once() == 1
        folder = other / PROCESSED / "cam1"
        gone = _index(calls, "unlink", original)
        assert _index(calls, "rename", folder / "img0.jpg") < _index(calls, "fsync", folder) < gone, calls
        assert _index(calls, "fsync", other / PROCESSED) < gone, calls  # the new cam1 folder's entry


def test_a_file_quarantined_on_another_file_system_is_on_disk_with_its_reason_before_the_original_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one copy of a file that cannot be used: its reason file and copy renamed into
    quarantine/cam1 and that folder fsynced before the original is removed."""
    with split_drop(tmp_path) as (root, other):
        (root / "cam1").mkdir()
        bad = root / "cam1" / "bad.jpg"
        bad.write_bytes(b"not an image")
        bad = Path(os.path.realpath(bad))
        drop = DropFolder(root, lambda *a: None, "move", stable_seconds=0.0)
        with _recorded(monkeypatch) as calls:
            drop.scan_once()
        folder = other / QUARANTINE / "cam1"
        gone = _index(calls, "unlink", bad)
        last_rename = max(_index(calls, "rename", folder / "bad.jpg"),
                          _index(calls, "rename", folder / f"bad.jpg{REASON_SUFFIX}"))
        assert last_rename < _index(calls, "fsync", folder) < gone, calls
        assert _index(calls, "fsync", other / QUARANTINE) < gone, calls


def test_the_daemons_quarantine_copy_is_on_disk_when_write_quarantine_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Daemon._fail`` writes the copy, then marks the image failed in the store ("a failed image
    always has its quarantine copy"): the copy and the reason file, and the folders made for them,
    are durable when ``write_quarantine`` returns."""
    qdir = tmp_path / "store" / QUARANTINE
    with _recorded(monkeypatch) as calls:
        dest = write_quarantine(qdir, Path("ab12"), "cannot decode", data=b"raw bytes")
    end = len(calls)
    assert max(_index(calls, "rename", dest), _index(calls, "rename", f"{dest}{REASON_SUFFIX}")) \
        < _index(calls, "fsync", qdir) < end
    assert _index(calls, "fsync", qdir.parent) < end  # quarantine/ was made here


def test_make_dirs_syncs_the_parent_of_each_folder_it_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``atomic_file(sync_dir=True)`` into a folder it makes (a store's new shard, a local bucket's
    first ``images/``): the new folders' entries are fsynced too, not only the last folder."""
    (tmp_path / "a").mkdir()
    with _recorded(monkeypatch) as calls:
        durable.write_bytes_atomic(tmp_path / "a" / "b" / "c" / "f.json", b"{}", sync_dir=True)
    syncs = [p for c, p in calls if c == "fsync"]
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert str(folder) in syncs, syncs
    with _recorded(monkeypatch) as calls:  # folders there already: one folder fsync, as before
        durable.write_bytes_atomic(tmp_path / "a" / "b" / "c" / "g.json", b"{}", sync_dir=True)
    assert [p for c, p in calls if c == "fsync" and not p.endswith(".tmp")] == [str(tmp_path / "a" / "b" / "c")]


# -- a real power cut ---------------------------------------------------------------------------
EXT4_IOC_SHUTDOWN, NOLOGFLUSH = 0x8004587D, 2


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _ext4(tmp_path: Path, name: str) -> Iterator[tuple[str, Path]]:
    """A fresh ext4 on a loop device, mounted at ``tmp_path/name``: yields (device, mount point)."""
    image, mnt = tmp_path / f"{name}.img", tmp_path / name
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    mnt.mkdir()
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"needs a loop device (root, losetup): {exc}")
    try:
        try:
            _run("mkfs.ext4", "-q", "-F", dev)
            _run("mount", dev, str(mnt))
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"needs mkfs.ext4 and mount: {exc}")
        try:
            yield dev, mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def _power_cut(*mounts: tuple[str, Path]) -> None:
    """Cut every file system at once (nothing more reaches the disk), then mount each again."""
    for _, mnt in mounts:
        fd = os.open(mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, NOLOGFLUSH.to_bytes(4, "little"))
        finally:
            os.close(fd)
    for dev, mnt in mounts:
        _run("umount", str(mnt))
        _run("mount", dev, str(mnt))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4"),
                    reason="needs root, losetup and mkfs.ext4 (a real power cut on loop-device file systems)")
def test_a_power_cut_after_the_move_keeps_the_processed_and_quarantined_copies(tmp_path: Path) -> None:
    """drop folder + store on one ext4, processed/ + quarantine/ on another. A good image and a bad
    file are taken, the store commits once more (an fsync on its file system, as the next image's
    commit does: that commits the originals' removals too), and the power goes. HEAD: the drop
    folder had lost both files and processed/ and quarantine/ held only hidden temporary copies."""
    with _ext4(tmp_path, "a") as a, _ext4(tmp_path, "b") as b:
        drop, other = a[1] / "drop", b[1]
        (drop / "cam1").mkdir(parents=True)
        for name in (PROCESSED, QUARANTINE):
            (other / name).mkdir()
            (drop / name).symlink_to(other / name)
        (drop / "cam1" / "img0.jpg").write_bytes(_jpeg(1))
        (drop / "cam1" / "zbad.jpg").write_bytes(b"not an image")
        os.sync()  # dropped long ago: on disk
        store = Store(a[1] / "store")
        sink = lambda data, source, meta, decoded: store.ingest(data, source, meta)  # noqa: E731
        DropFolder(drop, sink, "move", stable_seconds=0.0).scan_once()
        assert sorted(os.listdir(drop / "cam1")) == []
        store.close()
        fd = os.open(a[1] / "store", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _power_cut(a, b)
        left = sorted(os.listdir(drop / "cam1"))
        processed = sorted(os.listdir(other / PROCESSED / "cam1")) if (other / PROCESSED / "cam1").is_dir() else []
        quarantined = sorted(os.listdir(other / QUARANTINE / "cam1")) if (other / QUARANTINE / "cam1").is_dir() else []
        # each file is in the drop folder still, or in place with its bytes (and reason)
        assert "img0.jpg" in left or processed == ["img0.jpg"], (left, processed)
        assert "zbad.jpg" in left or quarantined == ["zbad.jpg", f"zbad.jpg{REASON_SUFFIX}"], (left, quarantined)
        if "img0.jpg" not in left:
            assert (other / PROCESSED / "cam1" / "img0.jpg").read_bytes() == _jpeg(1)
        if "zbad.jpg" not in left:
            assert (other / QUARANTINE / "cam1" / "zbad.jpg").read_bytes() == b"not an image"
