#!/usr/bin/env bash
# The main job on the embedded default (tooz file locks under state_path).
# Until the volume drivers land, it is the lock tool an operator uses today:
# check the configured provider, then run a shell command from four
# processes at once under one named lock and show that none overlapped.
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
    [[ -f "$conf" ]] || printf '[DEFAULT]\nstate_path = %s\n' "$(dirname "$conf")" > "$conf"
    rfsaa+=(--config-file "$conf")
fi

echo "== remotefs-aa lock check"
"${rfsaa[@]}" lock check

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo 0 > "$work/counter"
procs=4 rounds=5
echo
echo "== $procs processes x $rounds rounds of: remotefs-aa lock run demo-counter -- <read, sleep, write>"
start=$(date +%s%N)
for p in $(seq "$procs"); do
    (
        for r in $(seq "$rounds"); do
            "${rfsaa[@]}" lock run demo-counter -- \
                sh -c 'n=$(cat "$1"); sleep 0.05; echo $((n + 1)) > "$1"' sh "$work/counter"
        done
    ) &
done
wait
end=$(date +%s%N)
got=$(cat "$work/counter")
echo "counter = $got (expected $((procs * rounds))) in $(( (end - start) / 1000000 )) ms"
[[ "$got" -eq $((procs * rounds)) ]] && echo "no lost update: every critical section ran alone" || {
    echo "LOST UPDATES: the lock did not exclude the processes" >&2; exit 1; }
