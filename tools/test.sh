#!/usr/bin/env bash
# Install everything the test suite needs and run the whole suite (CI runs this through .ci/run).
#   - Debian packages: mosquitto (+ clients), socat, rabbitmq-server, systemd (for systemd-analyze),
#     installed without starting them or enabling them at boot (tools/apt_install.sh)
#   - Python: edgert in editable mode with the dev and litert extras, in .venv (tools/install.sh),
#     never in the system Python (PEP 668); PYTHON picks the interpreter that creates the venv
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k runtime -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGERT_VENV:-$PWD/.venv}"
export EDGERT_VENV="$VENV"

echo "== installing Debian test dependencies"
bash tools/install_test_brokers.sh

echo "== installing edgert[dev,litert]"
bash tools/install.sh dev,litert
PY="$VENV/bin/python"

echo "== lint: ruff and mypy"
"$PY" -m ruff check edgert tests tools
"$PY" -m mypy

echo "== running the test suite"
# The brokers were installed above: a broker test that cannot find one fails instead of skipping.
export EDGERT_REQUIRE_BROKERS=1
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure for this project" >&2
    exit 1
fi
exit "$rc"
