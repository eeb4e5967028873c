"""Durable writes: content replaced atomically, the usual file mode, nothing left behind."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from service.durable import write_bytes_atomic, write_json_atomic


def test_write_replaces_content_with_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "a" / "record.json"
    write_json_atomic(target, {"x": 1})
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_json_text_puts_number_arrays_on_one_line() -> None:
    import json

    from service.durable import json_text

    data = {"m": [[1.5, -2e-05, 0], [3, 4, 5]], "s": ["a\nb", "[1,\n2]"], "mixed": [1, "x"], "empty": [], "n": 7}
    text = json_text(data, flat_number_lists=True)
    assert json.loads(text) == data
    assert '    [1.5, -2e-05, 0],\n    [3, 4, 5]\n' in text  # a matrix: one row per line
    assert '"mixed": [\n    1,\n    "x"\n  ]' in text  # arrays holding anything else stay as they were
    assert json_text(data) == json.dumps(data, indent=2) + "\n"
