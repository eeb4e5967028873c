"""The wheel: what a user gets from ``pip install edge-annotator`` into an existing environment.

The appliance must run from the installed package alone, without the checkout beside it: the
demo bundle, the sample images, the protos and the Ground Truth template are package data,
and a file added under a package folder but left out of ``[tool.setuptools.package-data]``
would be missing only for wheel users (an editable install and the tests read the checkout).
The wheel is built offline (``--no-build-isolation --no-index``) from a copy of the sources,
so that neither the checkout's ``build/`` (which keeps files of earlier builds) nor its
``*.egg-info`` leaks into it; about 10 s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "sync", "protos", "exporter")

# The lowest version of a runtime dependency that the code needs, and why: pyproject.toml's
# floor must be at least this (users install into existing environments, where pip keeps
# whatever version already satisfies the floor).
NEEDED_FLOORS = {
    # 7.1.0 still calls the handlers under the observer's lock: the drop folder's rewatch
    # (folder removed and made again) deadlocked with it, and 7.1.1 reports an inotify
    # overflow as "events_lost" (service.dropfolder asks for a full walk then).
    "watchdog": "7.1.1",
    # botocore before 1.35.26 requires PreHumanTaskLambdaArn and AnnotationConsolidationConfig in
    # CreateLabelingJob, which [sync.review] leaves optional: the request was refused unsent.
    "boto3": "1.35.26",
    # ultralytics before 8.4.167 saved a JPEG without its end marker over itself, in place: the
    # dataset export hard-links the store's files, so training rewrote the store's bytes.
    "ultralytics": "8.4.167",
}


def _source_files() -> list[str]:
    """Every file under the package folders (paths relative to the checkout), caches left out."""
    out = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out.append(path.relative_to(ROOT).as_posix())
    return sorted(out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools (the build backend)")
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("69"):  # [build-system] requires; 65 fails on the metadata
        pytest.skip(f"setuptools {setuptools.__version__} is older than [build-system] requires (>= 69)")
    if not (importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel")):
        pytest.skip("no bdist_wheel: setuptools < 70.1 needs the wheel package ([build-system] requires)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("edge_annotator-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_every_file_of_the_packages_is_in_the_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _source_files() if f not in names]
    assert not missing, (f"not in the wheel (add them to [tool.setuptools.package-data] in pyproject.toml): "
                         f"{missing}")


def test_the_runtime_data_is_in_the_wheel(wheel: Path) -> None:
    """What the daemon, ``annotator demo`` and the sync agent read from the package."""
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    bundle = json.loads(z.read("service/assets/demo_bundle/bundle.json"))
    models = [f"service/assets/demo_bundle/{m['file']}" for m in bundle["models"].values()]
    samples = [n for n in names if re.fullmatch(r"service/assets/samples/[^/]+\.jpg", n)]
    needed = models + ["service/assets/samples/annotations.json", "protos/annotator/v1/annotator.proto",
                       "protos/annotator/v1/annotator_pb2.py", "sync/templates/keypoints.liquid.html"]
    assert len(samples) >= 12 and not [n for n in needed if n not in names], sorted(set(needed) - names)
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "annotator = service.cli:main" in z.read(meta).decode()


def test_declared_floors_cover_what_the_code_needs(wheel: Path) -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    z = zipfile.ZipFile(wheel)
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    floors = {}
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and ("extra ==" not in line or "ultralytics" in line):
            req = Requirement(line.split(":", 1)[1].strip())
            lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
            floors[req.name.lower()] = max(lows) if lows else None
    low = [f"{name}: the wheel allows {floors.get(name)}, the code needs >= {needed}"
           for name, needed in NEEDED_FLOORS.items() if floors.get(name) is None or floors[name] < Version(needed)]
    assert not low, "raise these floors in pyproject.toml (see NEEDED_FLOORS): " + "; ".join(low)


def test_demo_runs_from_the_wheel_alone(wheel: Path, tmp_path: Path) -> None:
    """``annotator demo`` (README's first command) from the unpacked wheel, in a folder far from
    the checkout: its bundle and sample images must come from the package."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import sys, service; from service.cli import main; print('package', service.__file__); "
            "sys.exit(main(['demo', '--timeout', '240']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"package {site / 'service' / '__init__.py'}" in r.stdout, r.stdout[:500]
    assert "12 images:" in r.stdout, r.stdout[-2000:]
    assert len(list((work / "demo-out" / "annotations").glob("*.json"))) == 12
