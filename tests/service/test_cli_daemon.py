"""``annotator annotate`` (no server) and ``--set`` parsing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.cli_daemon import parse_sets
from service.errors import ConfigError


def test_annotate_files_writes_sidecars(tmp_path: Path, pose_bundle: Any, coco_people_photos: list[Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 nothing")
    out = tmp_path / "out"
    rc = main(["annotate", str(coco_people_photos[0]), str(bad), "--bundle", str(pose_bundle.path), "--out", str(out)])
    assert rc == 0
    (sidecar,) = out.glob("*.json")
    record = json.loads(sidecar.read_text())
    assert record["persons"] and record["keypoint_names"][0] == "nose" and record["judgement"]["decision"]
    captured = capsys.readouterr()
    assert "broken.jpg: skipped" in captured.err and "1 skipped" in captured.out


@pytest.mark.parametrize("items,expected", [
    (None, {}), ([], {}), (["server.listen=127.0.0.1:0"], {"server.listen": "127.0.0.1:0"}),
    (["a.b=x=y"], {"a.b": "x=y"}),
])
def test_parse_sets(items: list[str] | None, expected: dict[str, str]) -> None:
    assert parse_sets(items) == expected


def test_parse_sets_refuses_missing_equals() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["server.listen"])


def test_serve_with_a_bad_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--set", "server.lisen=1"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_serve_without_a_bundle_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["serve", "--set", f"store.root={tmp_path / 'store'}", "--set", "server.listen=127.0.0.1:0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "engine.bundle: required here but not set" in err and "None" not in err
    assert not (tmp_path / "store").exists()  # refused before anything was opened


def test_a_store_root_under_a_file_is_one_line_not_a_traceback(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    demo_bundle = Path(__file__).parents[2] / "service" / "assets" / "demo_bundle"
    (tmp_path / "a-file").write_text("not a folder")
    args = ["serve", "--set", f"store.root={tmp_path / 'a-file' / 'store'}", "--set", "server.listen=127.0.0.1:0",
            "--set", f"engine.bundle={demo_bundle}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "annotator serve: error:" in err and "a-file" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, module, extra", [
    (["calibrate", "bundle", "data", "out"], "pycocotools", "eval"),
    (["compact", "bundle", "out"], "onnx", "train"),
])
def test_a_command_that_needs_an_extra_says_which_before_it_starts(argv: list[str], module: str, extra: str,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """In a runtime-only install (make demo's environment, /opt/annotator, the container) these
    commands ended in a ModuleNotFoundError traceback; calibrate only after it had labelled the
    whole set."""
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"annotator {argv[0]}: error: needs the '{extra}' extra" in err and f"[{extra}]'" in err
    assert "Traceback" not in err


def test_a_late_import_of_an_extra_is_one_line_too(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    import service.cli as cli

    def needs_matplotlib(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=needs_matplotlib, command="bench", verbose=False)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main([]) == 2 and "needs the 'eval' extra" in capsys.readouterr().err
