#!/usr/bin/env bash
# Remove the edge annotator's systemd services and program.
#
#   sudo deploy/uninstall.sh [--dry-run] [--purge]
#
# Stops and disables both units, removes them (and the GPU drop-in) and the virtual
# environment in /opt/annotator. Data and configuration stay (/var/lib/annotator,
# /srv/annotator, /etc/annotator, the user) unless --purge is given: then they are deleted too,
# images, store and reviewed labels included. --dry-run prints the commands instead.
set -euo pipefail

PREFIX=/opt/annotator
CONF_DIR=/etc/annotator
STATE_DIR=/var/lib/annotator
DATA_DIR=/srv/annotator
UNIT_DIR=/etc/systemd/system
USER_NAME=annotator
UNITS=(annotator.service annotator-sync.service)

DRY_RUN=0 PURGE=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,${/^#/!q;p;}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    echo "uninstall.sh: run as root (sudo), or with --dry-run to see the steps" >&2
    exit 1
fi

echo "== systemd units"
for unit in "${UNITS[@]}"; do
    # Not installed or already stopped is fine: keep going.
    run systemctl disable --now "$unit" || true
    run rm -f "$UNIT_DIR/$unit"
done
run rm -rf "$UNIT_DIR/annotator.service.d"
run systemctl daemon-reload
run systemctl reset-failed "${UNITS[@]}" || true

echo "== program"
run rm -rf "$PREFIX"

if [[ $PURGE -eq 1 ]]; then
    echo "== data, configuration and user (--purge)"
    run rm -rf "$STATE_DIR" "$DATA_DIR" "$CONF_DIR"
    if getent passwd "$USER_NAME" >/dev/null; then
        run userdel "$USER_NAME"
    fi
    if getent group "$USER_NAME" >/dev/null; then
        run groupdel "$USER_NAME"
    fi
else
    echo "kept: $STATE_DIR, $DATA_DIR, $CONF_DIR and user $USER_NAME (remove them with --purge)"
fi
