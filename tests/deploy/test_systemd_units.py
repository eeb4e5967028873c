"""The systemd units pass ``systemd-analyze verify`` and keep their hardening; the install
scripts run in --dry-run mode.

``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist, and the real
units point at /opt/annotator/bin/annotator (created by install.sh). The test therefore renders
each unit into tmp_path with that path replaced by a stand-in executable script in tmp_path;
every other line is verified as shipped.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("annotator.service", "annotator-sync.service")
EXEC = "/opt/annotator/bin/annotator"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install -y systemd)")


def directives(text: str) -> dict[str, list[str]]:
    """``{"Service.User": ["annotator"], ...}``; repeated keys keep every value in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.fixture
def rendered(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at an executable stand-in in tmp_path."""
    fake = tmp_path / "bin" / "annotator"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    out = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        assert EXEC in text
        (tmp_path / name).write_text(text.replace(EXEC, str(fake)))
        out.append(tmp_path / name)
    return out


@needs_analyze
def test_units_verify_cleanly(rendered: list[Path]) -> None:
    r = subprocess.run([ANALYZE, "verify", "--man=no", *map(str, rendered)],  # type: ignore[list-item]
                       capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any output at all is a failure.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_exposure_is_low(rendered: list[Path], name: str) -> None:
    unit = next(p for p in rendered if p.name == name)
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", "--threshold=25", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"exposure above 2.5:\n{r.stdout[-600:]}{r.stderr}"


@pytest.mark.parametrize("name, command", [("annotator.service", "serve"), ("annotator-sync.service", "sync")])
def test_unit_directives(name: str, command: str) -> None:
    d = directives((DEPLOY / "systemd" / name).read_text())
    expect = {
        "Service.Type": "notify", "Service.NotifyAccess": "main", "Service.Restart": "on-failure",
        "Service.DynamicUser": "no", "Service.User": "annotator", "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes", "Service.PrivateTmp": "yes", "Service.NoNewPrivileges": "yes",
        "Service.CapabilityBoundingSet": "", "Service.StateDirectory": "annotator",
        "Service.ConfigurationDirectory": "annotator",
        "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Service.ReadWritePaths": "/var/lib/annotator -/srv/annotator",
        "Install.WantedBy": "multi-user.target",
    }
    for key, value in expect.items():
        assert d.get(key) == [value], f"{name}: {key}={d.get(key)}, expected {value!r}"
    assert d["Service.ExecStart"] == [f"{EXEC} {command} --config /etc/annotator/annotator.toml"]
    for key in ("Service.WatchdogSec", "Service.RestartSec", "Service.LimitNOFILE"):
        assert d.get(key), f"{name}: {key} missing"


@pytest.mark.parametrize("script, args, expect", [
    ("install.sh", ["--dry-run"], ["+ systemctl daemon-reload", "+ systemctl enable annotator.service",
                                   f"+ python3 -m venv /opt/annotator"]),
    ("install.sh", ["--dry-run", "--gpu", "--with-sync"], ["PrivateDevices=no", "onnxruntime-gpu",
                                                            "--force-reinstall --no-deps onnxruntime-gpu",
                                                            "+ systemctl enable annotator-sync.service"]),
    ("uninstall.sh", ["--dry-run"], ["+ systemctl disable --now annotator.service", "+ rm -rf /opt/annotator",
                                     "kept: /var/lib/annotator"]),
    ("uninstall.sh", ["--dry-run", "--purge"], ["+ rm -rf /var/lib/annotator /srv/annotator /etc/annotator"]),
])
def test_scripts_dry_run(script: str, args: list[str], expect: list[str]) -> None:
    path = DEPLOY / script
    assert "set -euo pipefail" in path.read_text()
    r = subprocess.run(["bash", str(path), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for line in expect:
        assert line in r.stdout, f"{script} {args}: {line!r} not in\n{r.stdout}"


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_scripts_refuse_unknown_options(script: str) -> None:
    r = subprocess.run(["bash", str(DEPLOY / script), "--dry-run", "--frobnicate"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr


def test_installed_config_loads() -> None:
    from service.config import load_config

    cfg = load_config(DEPLOY / "annotator.toml", env={})
    assert str(cfg.store.root).startswith("/var/lib/annotator")
    assert cfg.server.listen.startswith("127.0.0.1:")
    for folder in (cfg.drop.folder, cfg.outputs.sidecar_dir):
        assert folder is not None and str(folder).startswith(("/var/lib/annotator", "/srv/annotator"))
