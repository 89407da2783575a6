#!/usr/bin/env bash
# Install edgert from this clone into a virtual environment, .venv in the clone, and never into the
# system Python (Debian 12 and Ubuntu 24.04 refuse that: PEP 668 "externally-managed-environment").
#   bash tools/install.sh              edgert[fast]; then run .venv/bin/edgert (e.g. .venv/bin/edgert demo)
#   bash tools/install.sh dev,litert   what tools/test.sh needs
# An existing .venv is reused; pip runs only when the extras or pyproject.toml/setup.py changed.
# Missing python3 or python3-venv (Debian/Ubuntu) is installed with apt when root or sudo is available.
# Environment: PYTHON (interpreter that creates the venv, default python3), EDGERT_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-fast}"
PYTHON="${PYTHON:-python3}"
VENV="${EDGERT_VENV:-$PWD/.venv}"
PIP=(--disable-pip-version-check)

python_ok() { # the interpreter exists, is >= 3.10 and can create a venv with pip
    "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

if ! venv_ok; then
    if ! python_ok; then
        if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
            pkgs="python3-venv"
            command -v "$PYTHON" >/dev/null 2>&1 || pkgs="python3 python3-venv"
            echo "== installing $pkgs (Debian/Ubuntu) to create $VENV"
            # shellcheck disable=SC2086  # word splitting of the package list is intended
            sh tools/apt_install.sh $pkgs
        fi
        if ! python_ok; then
            echo "error: $PYTHON cannot create a virtual environment (Python >= 3.10 with venv and ensurepip needed)" >&2
            echo "hint: on Debian/Ubuntu: sudo apt-get install python3-venv; or set PYTHON=/path/to/python3.X" >&2
            exit 1
        fi
    fi
    echo "== creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        echo "error: $VENV exists and is not a virtual environment; move it away or set EDGERT_VENV" >&2
        exit 1
    fi
    rm -rf "$VENV"  # a half-made venv (no pip) would otherwise be reused
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when what is asked for changed: the extras, the project metadata, or the clone's path.
stamp="$VENV/.edgert-installed-${EXTRAS//[^A-Za-z0-9]/_}"
want="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1) $PWD"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/edgert" ]; then
    echo "== edgert[$EXTRAS] already installed in $VENV"
else
    echo "== installing edgert[$EXTRAS] (editable) into $VENV"
    "$VENV/bin/python" -m pip install "${PIP[@]}" -q -e ".[$EXTRAS]"
    printf '%s\n' "$want" >"$stamp"
fi
