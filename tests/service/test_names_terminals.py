"""File names from real capture tools and boxes, and the terminals the commands print to.

- transfer tools' temporary names (Windows' ``NAME.TMP``, WinSCP's ``.filepart``, Chromium's
  ``.crdownload``, rclone's ``.partial``, any case) are left alone until renamed;
- awkward names (NFC and NFD, case, newline, tab, leading ``-``, Latin-1 bytes, a right-to-left
  override) are each stored once under a name that is valid UTF-8;
- commands print a name their stdout's encoding cannot hold (a Latin-1 byte under a UTF-8
  locale, an emoji under a Latin-1 one) instead of ending with a codec's error;
- progress bars write a line a quarter where stderr is not a terminal.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from procs import REPO, command_env
from service import cli
from service.dropfolder import PROCESSED, QUARANTINE, DropFolder
from service.store import Store


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _write_old(path: bytes, data: bytes) -> None:
    """``data`` at ``path`` with an mtime long past: stable at once, as a stalled transfer is."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (1_000_000_000, 1_000_000_000))


@pytest.mark.parametrize("temporary, final", [
    ("F1.TMP", "F1.jpg"), ("frame.JPG.PART", "frame.JPG"), ("f.jpg.filepart", "f.jpg"),
    ("f.jpg.crdownload", "f.jpg"), ("f.jpg.partial", "f.jpg"), ("cam1/f.jpg.Tmp", "cam1/f.jpg"),
])
def test_a_transfer_tools_temporary_name_waits_for_its_rename(tmp_path: Path, temporary: str, final: str) -> None:
    """A transfer stalled past stable_seconds (a slow link) under a temporary name that was
    not recognised (upper case, or a tool's own suffix) had its first half taken and quarantined
    as a truncated image; the writer then wrote the rest into a new file, quarantined too."""
    got: list[str] = []
    drop = DropFolder(tmp_path / "drop", lambda d, s, m, dec: got.append(s), stable_seconds=0.0)
    data = _jpeg(1)
    half = os.fsencode(drop.root / temporary)
    _write_old(half, data[:len(data) // 2])
    assert drop.scan_once() == 0 and drop.quarantined == 0 and os.path.exists(half)
    with open(half, "ab") as f:
        f.write(data[len(data) // 2:])
    os.rename(half, drop.root / final)
    assert drop.scan_once() == 1 and got == [f"drop:{final}"] and drop.quarantined == 0
    assert not (drop.root / QUARANTINE).exists()


def test_a_safari_download_folder_is_left_alone(tmp_path: Path) -> None:
    got: list[str] = []
    drop = DropFolder(tmp_path / "drop", lambda d, s, m, dec: got.append(s), stable_seconds=0.0)
    _write_old(os.fsencode(drop.root / "cam1" / "f.jpg.download" / "f.jpg"), _jpeg(2)[:300])
    assert drop.scan_once() == 0 and got == [] and drop.quarantined == 0


AWKWARD = [unicodedata.normalize("NFC", "café.jpg").encode(), unicodedata.normalize("NFD", "café.jpg").encode(),
           b"Case.jpg", b"case.jpg", b"UP.JPG", b"p.Png", b"x.jpeg", b"new\nline.jpg", b"tab\there.jpg",
           b"-leading.jpg", b"with space.jpg", b"caf\xe9.jpg", b"cam\xfc/\xe9t\xe9.jpg", b"\xe2\x80\xaerlo.jpg",
           b"emoji\xf0\x9f\x98\x80.jpg", b"b" * 251 + b".jpg"]


def test_awkward_names_are_each_stored_once_as_utf8_text(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    try:
        drop = DropFolder(tmp_path / "drop", lambda d, s, m, dec: store.ingest(d, s, m), stable_seconds=0.0)
        for i, name in enumerate(AWKWARD):
            _write_old(os.fsencode(drop.root) + b"/" + name, _jpeg(10 + i))
        assert drop.scan_once() == len(AWKWARD) and drop.scan_once() == 0 and drop.quarantined == 0
        rows = store.list(limit=100)[0]
        sources = sorted(r.source for r in rows)
        assert len(rows) == len(AWKWARD) and len(set(sources)) == len(AWKWARD)
        for s in sources:
            s.encode("utf-8")  # strict: no lone surrogate reaches the store
        assert "drop:caf\\xe9.jpg" in sources and "drop:new\nline.jpg" in sources
        assert {r.camera for r in rows if r.camera} == {"cam\\xfc"}
        kept = [f for _, _, files in os.walk(os.fsencode(drop.root / PROCESSED)) for f in files]
        assert len(kept) == len(AWKWARD)  # each file moved out once, under its own name
    finally:
        store.close()


def _run(args: list[str], encoding: str) -> subprocess.CompletedProcess[bytes]:
    """``annotator ARGS`` with stdout and stderr in ``encoding`` and ``strict`` errors, as a
    terminal's locale sets them (en_US.UTF-8, de_DE.ISO-8859-1), whatever locales this box has."""
    env = command_env(extra={"PYTHONIOENCODING": encoding, "YOLO_OFFLINE": "1"})
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env, capture_output=True,
                          timeout=300)


def test_annotate_prints_a_latin1_name_under_a_utf8_locale_and_goes_on(tmp_path: Path) -> None:
    """A Latin-1 name (an SMB share, a FAT card) ended ``annotate`` of a folder at its line:
    exit 2 with "'utf-8' codec can't encode character '\\udce9'", the files after it not annotated."""
    folder = tmp_path / "in"
    for i, name in enumerate([b"a.jpg", b"caf\xe9.jpg", b"z.jpg"]):
        _write_old(os.fsencode(folder) + b"/" + name, _jpeg(30 + i))
    res = _run(["annotate", str(folder), "--out", str(tmp_path / "out")], "utf-8")
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert b"caf\\xe9.jpg: " in res.stdout and b"z.jpg: " in res.stdout
    assert len(list((tmp_path / "out").glob("*.json"))) == 3


def test_submit_sends_a_latin1_name_and_goes_on(tmp_path: Path, served: tuple[Any, int]) -> None:
    """``submit`` of a folder holding a Latin-1 name ended there: the name went as the request id,
    which protobuf must encode as UTF-8 (exit 2, a codec's message, the files after it not sent)."""
    folder = tmp_path / "in"
    for i, name in enumerate([b"a.jpg", b"caf\xe9.jpg", b"z.jpg"]):
        _write_old(os.fsencode(folder) + b"/" + name, _jpeg(40 + i))
    res = _run(["submit", str(folder), "--server", f"127.0.0.1:{served[1]}"], "utf-8")
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert b"caf\\xe9.jpg: " in res.stdout and b"z.jpg: " in res.stdout


def test_show_prints_a_camera_its_terminal_cannot_write(tmp_path: Path) -> None:
    """A camera folder named with an emoji (or CJK) ended ``show`` under a Latin-1 locale after it
    drew the pictures, exit 2 with the codec's message; a newline or an escape sequence in a
    camera broke the table's rows or recoloured the terminal."""
    store = Store(tmp_path / "store", clock=lambda: 1_000.0)
    ids = []
    for i, camera in enumerate(["\U0001f600cam", "cam\x1b[31m\nred"]):
        image_id, _ = store.ingest(b"\xff\xd8 auto %d" % i, "test", {"camera": camera})
        store.claim("w")
        store.complete(image_id, "w", {"width": 8, "height": 8, "heads": [], "persons": []}, "b", "auto_accepted",
                       0.9, [], audit=False)
        ids.append(image_id)
    store.prune_auto_images(2_000.0)  # a listed row without bytes: nothing to draw, the table only
    store.close()
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n')
    res = _run(["show", "--config", str(config), "--out", str(tmp_path / "show")], "latin-1")
    assert res.returncode == 0, res.stderr.decode("latin-1")
    out = res.stdout.decode("latin-1")
    assert "\\U0001f600cam" in out and "cam\\x1b[31m\\nred" in out and "\x1b" not in out
    assert len(out.splitlines()) == 3 and all(i[:12] in out for i in ids)


def test_every_command_prints_names_in_any_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream set up by ``main``: a name's byte that is not UTF-8 as ``\\xNN`` (as the store
    and the logs write it), a character the encoding lacks as a backslash escape."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="latin-1", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    cli._tolerant_output()
    print(os.fsdecode(b"caf\xe9.jpg"), "caf\u00e9", "\U0001f600", end="")
    stream.flush()
    assert raw.getvalue() == b"caf\\xe9.jpg caf\xe9 \\U0001f600"


class _Stderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_a_progress_bar_is_a_line_a_quarter_in_a_log(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    """``annotator synth 2>log`` (journald, ``| tee``) wrote every redraw into one line: 100,000
    carriage returns for as many images. On a terminal it is still redrawn in place."""
    err = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    show = cli._progress("rendering")
    for done in range(1, 1001):
        show(done, 1000)
    text = err.getvalue()
    if tty:
        assert text.count("\r") == 1000 and text.endswith("1000/1000\n")
    else:
        assert "\r" not in text and text.splitlines() == [
            f"rendering [{'#' * (30 * n // 4)}{'.' * (30 - 30 * n // 4)}] {250 * n}/1000" for n in (1, 2, 3, 4)]
