#!/usr/bin/env bash
# The main job on the embedded default (tooz file locks under state_path).
# Checks the lock provider, then runs the demo: four processes, each with its
# own local driver, privsep daemon and lock connection, create / delete /
# revert snapshots, clone and copy from snapshots on the same three volumes,
# then every chain and every byte is verified and the volumes are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
rfsaa=(.venv/bin/remotefs-aa)
if [[ -n "${REMOTEFS_AA_CONF:-}" ]]; then
    rfsaa+=(--config-file "$REMOTEFS_AA_CONF")
elif [[ $(id -u) -ne 0 ]]; then
    # The default state_path (/var/lib/remotefs_aa) needs root; use a user dir.
    conf="${XDG_STATE_HOME:-$HOME/.local/state}/remotefs_aa/remotefs_aa.conf"
    mkdir -p "$(dirname "$conf")"
    [[ -f "$conf" ]] || printf '[DEFAULT]\nstate_path = %s/state\n' "$(dirname "$conf")" > "$conf"
    rfsaa+=(--config-file "$conf")
fi

echo "== remotefs-aa lock check"
"${rfsaa[@]}" lock check
echo
echo "== remotefs-aa demo: 4 processes x 15 random snapshot operations on 3 shared volumes"
"${rfsaa[@]}" demo --workers 4 --volumes 3 --operations 15
echo
echo "== remotefs-aa stats"
"${rfsaa[@]}" stats
