"""The set-up paths (make's venvs, deploy/install.sh) check the Python they are given.

An older Python failed only at pip's resolver ("No matching distribution found for
watchdog>=7.1.1", naming no Python), and ``python3.11 -m venv DIR`` over the venv that run left
kept its python3 link to the old interpreter, so the corrected command failed too (make: the
same resolver error; install.sh: in ensurepip). install.sh also made a venv of a pyenv Python
under /root whose units (ProtectHome=yes) and doctor line as the service user got "Permission
denied". The Pythons here are stand-ins that run the real interpreter with another version or
location reported, so no old Python needs to be installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
MAKE = shutil.which("make")


def stand_in(path: Path, version: tuple[int, int] = (3, 11), base: str | None = None) -> Path:
    """A ``python`` that runs ``-c CODE`` in this interpreter, reporting ``version`` and, when
    given, ``base`` as the interpreter a venv would link to (``sys._base_executable``)."""
    lines = [f"#!{sys.executable}", "import sys",
             f"sys.version_info = ({version[0]}, {version[1]}, 9, 'final', 0)"]
    if base:
        lines += [f"sys._base_executable = {base!r}", f"sys.base_prefix = {str(Path(base).parents[1])!r}"]
    lines += ["if sys.argv[1:2] != ['-c']:", "    sys.exit('stand-in: only -c')",
              "code = sys.argv[2]", "sys.argv = ['-c'] + sys.argv[3:]",
              "exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})"]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(MAKE is None, reason="make not installed")
def test_make_refuses_an_old_python_before_making_a_venv(tmp_path: Path) -> None:
    old = stand_in(tmp_path / "python3.10", (3, 10))
    venv = tmp_path / "venv"
    r = subprocess.run([MAKE, "-C", str(ROOT), f"{venv}/.installed", f"LS_VENV={venv}", f"PYTHON={old}"],  # type: ignore[list-item]
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"{old} is Python 3.10; the annotator needs 3.11 or newer" in r.stderr, r.stderr
    assert "PYTHON=python3.11" in r.stderr and not venv.exists()


@pytest.mark.skipif(MAKE is None, reason="make not installed")
def test_make_remakes_a_venv_of_an_older_python(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stand_in(venv / "bin" / "python", (3, 10))  # what a run with python3.10 left behind
    # pip is stopped at once by a flag it does not know: only the venv step is under test.
    r = subprocess.run([MAKE, "-C", str(ROOT), f"{venv}/.installed", f"LS_VENV={venv}",  # type: ignore[list-item]
                        f"PYTHON={sys.executable}", "PIP_FLAGS=--no-such-flag"],
                       capture_output=True, text=True, timeout=300)
    assert "no such option: --no-such-flag" in r.stderr, r.stderr
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2] >= (3, 11))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_install_says_an_old_python_first(tmp_path: Path) -> None:
    old = stand_in(tmp_path / "python3.10", (3, 10))
    r = install("--dry-run", "--python", str(old))
    assert r.returncode == 0  # a dry run goes on listing the steps
    assert "is Python 3.10; the annotator needs 3.11 or newer: give --python" in r.stderr, r.stderr
    assert "(a real run stops here)" in r.stderr
    if os.geteuid() != 0:  # the real run stops before its root check (as root it would go on to groupadd)
        r = install("--python", str(old))
        assert r.returncode == 1 and "is Python 3.10" in r.stderr and "run as root" not in r.stderr


def test_install_refuses_a_python_the_services_cannot_see(tmp_path: Path) -> None:
    home = stand_in(tmp_path / "python3", base="/home/alice/.pyenv/versions/3.11.9/bin/python3.11")
    r = install("--dry-run", "--python", str(home))
    assert "lives in /home/alice/.pyenv/versions/3.11.9/bin/python3.11, which the services cannot see" in r.stderr
    assert "ProtectHome=yes" in r.stderr and "--python" in r.stderr
    good = stand_in(tmp_path / "python3.11", base="/usr/bin/python3.11")
    r = install("--dry-run", "--python", str(good))
    assert r.returncode == 0 and "install.sh:" not in r.stderr, r.stderr


def test_install_remakes_a_venv_of_another_python(tmp_path: Path) -> None:
    """/opt/annotator is an overlay in a private mount namespace: nothing is written to the box."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /opt")
    good = stand_in(tmp_path / "python3.11", base="/usr/bin/python3.11")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    script = (f"mount -t overlay overlay -o lowerdir=/opt,upperdir={upper},workdir={work} /opt || exit 97\n"
              "mkdir -p /opt/annotator/bin && ln -sfn \"$1\" /opt/annotator/bin/python3\n"
              f"exec bash {INSTALL} --dry-run --python {good}\n")

    def dry_run(link: str) -> str:
        r = subprocess.run(["unshare", "-m", "bash", "-c", script, "sh", link], capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 97:
            pytest.skip(f"no overlay mount here: {r.stderr.strip()[:200]}")
        assert r.returncode == 0, r.stderr
        return r.stdout

    venv_line = f"+ {good} -m venv /opt/annotator"
    out = dry_run("/root/.pyenv/versions/3.11.7/bin/python3")  # an earlier install's interpreter
    assert "+ rm -rf /opt/annotator\n" + venv_line in out, out
    out = dry_run("/usr/bin/python3.11")  # the same interpreter: an upgrade keeps the venv
    assert "+ rm -rf /opt/annotator\n" not in out and venv_line in out, out
