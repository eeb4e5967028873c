"""A lock file path that is a link to a file not made yet (a folder under /run a boot emptied)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_lock_linked_to_a_file_not_made_yet_is_made_through_the_link(tmp_path: Path) -> None:
    """``O_CREAT | O_EXCL`` never follows a link: ``hold`` looped for ever at full CPU (a real
    ``annotator serve`` with ``serve.lock`` linked into an emptied /run folder: no log line, 7 s of
    CPU in 8 s). The file is made through the link, as before the lock files were made exclusively."""
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "serve.lock").symlink_to(run / "serve.lock")
    code = ("import sys; from pathlib import Path; from service.lockfile import hold; "
            "hold(Path(sys.argv[1])); print('held')")
    try:
        got = subprocess.run([sys.executable, "-c", code, str(tmp_path / "serve.lock")], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("hold() never returned on a link to a lock file not made yet") from None
    assert got.stdout.strip() == "held", got.stderr
    assert (run / "serve.lock").read_text().strip().isdigit()
