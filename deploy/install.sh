#!/usr/bin/env bash
# Install the edge annotator as systemd services on a Debian/Ubuntu-like machine.
#
#   sudo deploy/install.sh [--dry-run] [--gpu] [--with-sync] [--no-enable] [--python PYTHON]
#
# What it does (every step is idempotent; re-run it to upgrade):
#   1. a system user and group "annotator" (no login shell, home /var/lib/annotator);
#   2. a virtual environment in /opt/annotator with this checkout installed (onnxruntime-gpu
#      instead of onnxruntime with --gpu);
#   3. /etc/annotator/annotator.toml from deploy/annotator.toml and an empty annotator.env when
#      none exists yet (existing ones are never overwritten), /var/lib/annotator/store,
#      /srv/annotator/{drop,sidecars} (drop/ with a default ACL for the group, given setfacl);
#   4. the units into /etc/systemd/system (plus a GPU drop-in with --gpu), daemon-reload,
#      enable annotator.service (and annotator-sync.service with --with-sync).
# Nothing is started: adopt a bundle, check with `annotator doctor`, then `systemctl start annotator`.
# --dry-run prints the commands instead of running them (needs no root, changes nothing).
set -euo pipefail

PREFIX=/opt/annotator
CONF_DIR=/etc/annotator
STATE_DIR=/var/lib/annotator
DATA_DIR=/srv/annotator
UNIT_DIR=/etc/systemd/system
USER_NAME=annotator
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY_RUN=0 GPU=0 WITH_SYNC=0 ENABLE=1 PYTHON=python3

# The header comment above, up to its first non-comment line.
usage() { sed -n '2,${/^#/!q;p;}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --gpu) GPU=1 ;;
        --with-sync) WITH_SYNC=1 ;;
        --no-enable) ENABLE=0 ;;
        --python) PYTHON="${2:?--python needs a value}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# run CMD...: run it, or print it (shell-quoted) with --dry-run.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# The interpreter the virtual environment links to: Python 3.11+ (an older one failed only at
# pip's resolver, "No matching distribution found for watchdog>=7.1.1"), and one the services can
# run: ProtectHome=yes hides /home, /root and /run/user from them (a pyenv Python there made an
# install whose units, and doctor as the service user, got "Permission denied"). Under sudo,
# python3 is the one on sudo's own PATH. --dry-run says the problem and goes on listing the steps.
PY_EXE="" PY_PROBLEM=""
check_python() {
    local info ok version prefix p
    if ! info=$("$PYTHON" -c 'import os, sys
print(int(sys.version_info >= (3, 11)), "%d.%d" % sys.version_info[:2])
print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
print(os.path.realpath(sys.base_prefix))' 2>/dev/null); then
        PY_PROBLEM="$PYTHON does not run: give --python a Python 3.11 or newer, e.g. --python /usr/bin/python3.11"
        return
    fi
    { read -r ok version; read -r PY_EXE; read -r prefix; } <<<"$info"
    if [[ $ok != 1 ]]; then
        PY_PROBLEM="$PYTHON ($PY_EXE) is Python $version; the annotator needs 3.11 or newer: give --python, e.g. --python /usr/bin/python3.11"
        return
    fi
    for p in "$PY_EXE" "$prefix"; do
        case "$p/" in
            /home/*|/root/*|/run/user/*)
                PY_PROBLEM="$PYTHON lives in $p, which the services cannot see (ProtectHome=yes hides /home, /root and /run/user): give --python a Python 3.11+ installed elsewhere, e.g. --python /usr/bin/python3.11"
                return ;;
        esac
    done
}
check_python
if [[ -n $PY_PROBLEM ]]; then
    if [[ $DRY_RUN -eq 0 ]]; then
        echo "install.sh: $PY_PROBLEM" >&2
        exit 1
    fi
    echo "install.sh: $PY_PROBLEM (a real run stops here)" >&2
fi

if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    echo "install.sh: run as root (sudo), or with --dry-run to see the steps" >&2
    exit 1
fi
[[ -f "$SRC/pyproject.toml" ]] || { echo "install.sh: $SRC is not the annotator checkout" >&2; exit 1; }

echo "== user and group $USER_NAME"
if ! getent group "$USER_NAME" >/dev/null; then
    run groupadd --system "$USER_NAME"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
    run useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "edge annotator" "$USER_NAME"
fi

echo "== virtual environment $PREFIX"
# `venv` over an environment of another Python keeps its python3 link to that one (a re-run with a
# corrected --python failed in ensurepip, the old interpreter still linked): made afresh instead.
if [[ -n $PY_EXE && ( -e "$PREFIX/bin/python3" || -L "$PREFIX/bin/python3" ) ]] \
        && [[ "$(readlink -f "$PREFIX/bin/python3")" != "$PY_EXE" ]]; then
    run rm -rf "$PREFIX"
fi
run "$PYTHON" -m venv "$PREFIX"
# pip builds in the checkout's build/, which keeps the files of an earlier build: without this an
# upgrade would ship modules deleted since.
run rm -rf "$SRC/build"
run "$PREFIX/bin/pip" install --quiet --disable-pip-version-check --upgrade "$SRC"
run rm -rf "$SRC/build"  # root's build/ would stop a later `make` as the checkout's owner
if [[ $GPU -eq 1 ]]; then
    # onnxruntime and onnxruntime-gpu share the module name: exactly one of them.
    run "$PREFIX/bin/pip" uninstall --quiet --yes onnxruntime
    # [cuda,cudnn]: the CUDA and cuDNN libraries as pip packages, matching the wheel's CUDA
    # major version (the engine preloads them); only the NVIDIA driver comes from the system.
    run "$PREFIX/bin/pip" install --quiet --disable-pip-version-check "onnxruntime-gpu[cuda,cudnn]>=1.21"
    # On a re-run (an upgrade) the first pip step reinstalled CPU onnxruntime over the GPU files
    # and the uninstall removed the module both share, while pip calls onnxruntime-gpu "already
    # satisfied": put its files back (only its own; the libraries above stay).
    run "$PREFIX/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps \
        "onnxruntime-gpu>=1.21"
fi

echo "== folders and configuration"
run install -d -m 0750 -o root -g "$USER_NAME" "$CONF_DIR"
run install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$STATE_DIR" "$STATE_DIR/store"
# setgid: files copied in by members of the group stay in the group.
run install -d -m 2770 -o "$USER_NAME" -g "$USER_NAME" "$DATA_DIR" "$DATA_DIR/drop" "$DATA_DIR/sidecars"
# Capture tools create drop/<camera>/ folders; with their usual umask 022 the group could not move
# files out of them. A default ACL gives the group rwx on all that is created below drop/.
if command -v setfacl >/dev/null; then
    run setfacl -d -m "g:$USER_NAME:rwx" "$DATA_DIR/drop" \
        || echo "warning: no default ACL on $DATA_DIR/drop: capture tools must write with umask 002" >&2
else
    echo "setfacl not found (package acl): capture tools must write into $DATA_DIR/drop with umask 002"
fi
if [[ -e "$CONF_DIR/annotator.toml" ]]; then
    echo "keeping the existing $CONF_DIR/annotator.toml"
else
    run install -m 0640 -o root -g "$USER_NAME" "$SRC/deploy/annotator.toml" "$CONF_DIR/annotator.toml"
fi
# Secrets for both units (ANNOTATOR_SERVER__TOKEN=..., AWS keys): empty until you fill it in.
if [[ ! -e "$CONF_DIR/annotator.env" ]]; then
    run install -m 0640 -o root -g "$USER_NAME" /dev/null "$CONF_DIR/annotator.env"
fi

echo "== systemd units"
run install -m 0644 "$SRC/deploy/systemd/annotator.service" "$UNIT_DIR/annotator.service"
run install -m 0644 "$SRC/deploy/systemd/annotator-sync.service" "$UNIT_DIR/annotator-sync.service"
if [[ $GPU -eq 1 ]]; then
    run install -d -m 0755 "$UNIT_DIR/annotator.service.d"
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "+ write $UNIT_DIR/annotator.service.d/gpu.conf ([Service] PrivateDevices=no)"
    else
        printf '# CUDA needs /dev/nvidia*; written by install.sh --gpu\n[Service]\nPrivateDevices=no\n' \
            > "$UNIT_DIR/annotator.service.d/gpu.conf"
    fi
fi
run systemctl daemon-reload
if [[ $ENABLE -eq 1 ]]; then
    run systemctl enable annotator.service
    if [[ $WITH_SYNC -eq 1 ]]; then
        run systemctl enable annotator-sync.service
    fi
fi

cat <<MSG
== done
Next: review $CONF_DIR/annotator.toml (secrets go into $CONF_DIR/annotator.env), then
  sudo $PREFIX/bin/annotator models adopt BUNDLE_DIR --config $CONF_DIR/annotator.toml
  sudo chown -R $USER_NAME: $STATE_DIR/store
  sudo -u $USER_NAME sh -c 'set -a; . $CONF_DIR/annotator.env; exec $PREFIX/bin/annotator doctor --config $CONF_DIR/annotator.toml'
  sudo systemctl start annotator
  $PREFIX/bin/annotator status
MSG
