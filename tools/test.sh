#!/usr/bin/env bash
# Install everything the test suite needs and run the whole suite.
#   - Debian packages: mosquitto (+ clients), socat, rabbitmq-server, systemd (for systemd-analyze)
#   - Python: edgert in editable mode with the dev and litert extras
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k runtime -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

echo "== installing Debian test dependencies"
bash tools/install_test_brokers.sh
# systemd-analyze verifies the shipped unit file (PID 1 need not be systemd)
if ! command -v systemd-analyze >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd
fi

echo "== installing edgert[dev,litert]"
"$PYTHON" -m pip install --disable-pip-version-check -q -e ".[dev,litert]"

echo "== lint: ruff and mypy"
"$PYTHON" -m ruff check edgert tests tools
"$PYTHON" -m mypy

echo "== running the test suite"
set +e
"$PYTHON" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure for this project" >&2
    exit 1
fi
exit "$rc"
