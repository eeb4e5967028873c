"""A daemon whose files are limited in size (``ulimit -f``, systemd's ``LimitFSIZE``).

The store keeps a copy of each image; a copy over the limit failed with EFBIG, which is a disk
fault (the store cannot write). So one image larger than the limit paused all intake for good:
the drop folder held it and every image behind it, and ``status`` said "cannot write". Now the
daemon lowers its byte limit to the process's file-size limit at start (said once), and such an
image is quarantined as too large while the others are annotated."""
from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from procs import REPO, command_env, sample_images, serve_toml, wait_for

LIMIT = 1536 * 1024  # bytes a file of the daemon may reach


def _drop(path: Path, data: bytes) -> None:
    """Written beside and renamed in (stable_seconds is 0: a file written in place is taken empty)."""
    tmp = path.with_name("." + path.name)
    tmp.write_bytes(data)
    tmp.rename(path)


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_an_image_over_the_file_size_limit_is_quarantined_and_the_others_annotated(tmp_path: Path) -> None:
    from service.cli_daemon import DEMO_BUNDLE
    from service.store import Store

    (tmp_path / "drop").mkdir()
    config = tmp_path / "a.toml"
    config.write_text(serve_toml(tmp_path, DEMO_BUNDLE))
    noise = np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8)
    big = cv2.imencode(".png", noise)[1].tobytes()
    assert len(big) > LIMIT
    small = sample_images(4, "fsize")
    log = tmp_path / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=command_env(),
                                preexec_fn=_limited)
    try:
        wait_for(lambda: "annotator serving" in log.read_text(), proc, log)
        for i, data in enumerate(small[:2]):
            _drop(tmp_path / "drop" / f"a{i}.jpg", data)
        _drop(tmp_path / "drop" / "big.png", big)
        for i, data in enumerate(small[2:]):
            _drop(tmp_path / "drop" / f"b{i}.jpg", data)

        def settled() -> bool:
            store = Store(tmp_path / "store")
            try:
                return all((row := store.get(hashlib.sha256(d).hexdigest())) is not None and row.state != "received"
                           for d in small)
            finally:
                store.close()

        wait_for(lambda: settled() and (tmp_path / "drop" / "quarantine" / "big.png.reason.txt").exists(), proc, log,
                 seconds=120)
    finally:
        proc.terminate()
        proc.wait(30)
    reason = (tmp_path / "drop" / "quarantine" / "big.png.reason.txt").read_text()
    assert f"{len(big)} bytes, more than the limit of {LIMIT}" in reason and "ulimit -f" in reason, reason
    text = log.read_text()
    assert f"may not write files over {LIMIT} bytes" in text
    assert "cannot write" not in text and "disk fault" not in text, text[-2000:]
