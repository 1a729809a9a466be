#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine: system packages (only when missing) and
# a virtualenv in .venv with remotefs_aa installed in editable mode.
#
#   tools/bootstrap.sh           what the main job needs
#   tools/bootstrap.sh --test    plus the lock-backend servers the tests start
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

packages=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed" || packages+=("$1"); }
command -v python3 >/dev/null || need python3
python3 -c 'import venv, ensurepip' 2>/dev/null || need python3-venv
# The main job: qemu-img / qemu-io, and sudo to start the privileged daemon.
need qemu-utils
need sudo
if (( want_test )); then
    # Real servers for the functional tests (started by the tests on 127.0.0.1),
    # plus Debian's venv for the privileged-helper tests (an unprivileged user's venv).
    # GlusterFS (server + FUSE client) and iproute2 for the shared-filesystem tests
    # (xfsprogs: a loop-mounted XFS with reflinks for the copy-offload test),
    # which run glusterd in a network namespace of their own.
    # The races study (benchmarks/races, tests/functional/test_races.py): a three-node
    # Galera cluster (the galera-4 provider; rsync for state transfer to joiners)
    # behind HAProxy.
    for p in redis-server zookeeper etcd-server etcd-client memcached mariadb-server postgresql \
        python3-venv glusterfs-server glusterfs-client iproute2 util-linux xfsprogs \
        galera-4 haproxy rsync; do
        need "$p"
    done
fi
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi

# apt-get, finishing a package configuration an earlier run left interrupted
# (a killed apt, a full disk): apt then refuses everything with "dpkg was
# interrupted, you must manually run 'dpkg --configure -a'". That is what it
# asks for and this script runs as root anyway, so do it, say so, retry once.
apt_get() {
    local log rc=0
    log=$(mktemp)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "$@" 2>"$log" || rc=$?
    if (( rc )) && grep -q "dpkg --configure -a" "$log"; then
        echo "bootstrap: an earlier package installation was interrupted; running" \
            "'dpkg --configure -a' as apt asks, then retrying" >&2
        DEBIAN_FRONTEND=noninteractive $SUDO dpkg --configure -a
        rc=0
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get "$@" 2>"$log" || rc=$?
    fi
    cat "$log" >&2
    rm -f "$log"
    return "$rc"
}

if (( ${#packages[@]} )); then
    echo "bootstrap: installing ${packages[*]}" >&2
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
extras=""
(( want_test )) && extras="[test]"
stamp=".venv/.installed${extras}"
if [[ ! -f "$stamp" || setup.cfg -nt "$stamp" ]]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
    touch "$stamp"
fi
