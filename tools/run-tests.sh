#!/usr/bin/env bash
# Everything a fresh Debian 12 machine needs to run the whole test suite:
# system packages, the virtualenv, lint, unit tests, then functional tests
# (which start Redis, ZooKeeper, etcd and memcached themselves on 127.0.0.1).
# Extra arguments go to pytest, e.g. tools/run-tests.sh -k redis
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh --test
.venv/bin/ruff check remotefs_aa tests benchmarks
.venv/bin/ruff format --check remotefs_aa tests benchmarks
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra tests/unit tests/functional "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "run-tests: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit $rc
