#!/usr/bin/env bash
# Build a Debian package of edgert for this machine's architecture and Debian/Ubuntu Python:
#   /opt/edgert                        a venv built from this clone's wheel: edgert[fast] and its dependencies
#   /usr/bin/edgert                    -> /opt/edgert/bin/edgert
#   /usr/lib/systemd/system/edgert.service, edgert-provision@.service, /usr/lib/sysusers.d/edgert.conf, /usr/lib/tmpfiles.d/edgert.conf
#   /etc/edgert/edgert.toml            the annotated example config (a conffile)
#   /usr/share/edgert/models           -> the bundled sample models
#   bash tools/build_deb.sh [OUT_DIR]  (default dist/); prints the path of the .deb it wrote
# Install with `sudo apt install ./dist/edgert_*.deb` (or dpkg -i). The venv is tied to the Python
# minor version it was built with, so build on the distribution release you deploy to.
# Environment: DEB_PYTHON (default /usr/bin/python3; must be the distribution's python3),
# EDGERT_DEB_EXTRAS (default fast).
set -euo pipefail
umask 022
# Only the package's own venv may be seen while building it (a PYTHONPATH checkout would shadow the wheel).
unset PYTHONPATH PYTHONHOME
cd "$(dirname "$0")/.."
SRC="$PWD"
OUT_DIR="$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)"
PY="${DEB_PYTHON:-/usr/bin/python3}"
EXTRAS="${EDGERT_DEB_EXTRAS:-fast}"
PREFIX=/opt/edgert
PIP=(--disable-pip-version-check)

for tool in dpkg-deb dpkg; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found (Debian/Ubuntu only)" >&2; exit 1; }
done
if ! "$PY" -c 'import sys; sys.exit(sys.base_prefix != "/usr" or sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: $PY is not the distribution's Python >= 3.10 (the package depends on Debian's python3)" >&2
    exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "== installing python3-venv to build the venv"
    sh tools/apt_install.sh python3-venv
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
arch="$(dpkg --print-architecture)"
pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
next_pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')"
[ -n "$version" ] || { echo "error: no version in pyproject.toml" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
stage="$root$PREFIX"

echo "== building the edgert $version wheel"
# Build from a copy: the clone gets no build/ or egg-info, and local venvs and caches stay out.
mkdir -p "$work/src"
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build \
    --exclude='*.egg-info' --exclude='__pycache__' --exclude=./.mypy_cache --exclude=./.ruff_cache \
    --exclude=./.pytest_cache -cf - . | tar -C "$work/src" -xf -
"$PY" -m venv "$stage"
"$stage/bin/python" -m pip "${PIP[@]}" -q wheel --no-deps -w "$work/wheel" "$work/src"
wheel="$(ls "$work"/wheel/edgert-*.whl)"

echo "== installing edgert[$EXTRAS] into $PREFIX (staged)"
"$stage/bin/python" -m pip "${PIP[@]}" -q install --no-compile "$wheel[$EXTRAS]"
# Where the wheel was installed from is a temporary path on the build machine: not worth shipping.
dist_info="$(ls -d "$stage"/lib/python*/site-packages/edgert-*.dist-info)"
rm -f "$dist_info/direct_url.json"
sed -i '/direct_url\.json/d' "$dist_info/RECORD"
# The venv was made at the staging path: point its scripts and pyvenv.cfg at /opt/edgert.
grep -rlIF "$stage" "$stage" | while read -r f; do
    sed -i "s|$stage|$PREFIX|g" "$f"
done
# Bytecode with the final paths, shipped in the package (so dpkg removes it again).
"$stage/bin/python" -m compileall -q -j 0 -s "$root" -p / "$stage/lib" >/dev/null || true
site="$PREFIX/lib/python$pyver/site-packages"
[ -f "$root$site/edgert/__init__.py" ] || { echo "error: edgert is not in $site" >&2; exit 1; }

echo "== adding the unit, users, directories and config"
install -D -m 0644 packaging/edgert.service "$root/usr/lib/systemd/system/edgert.service"
install -D -m 0644 packaging/edgert-provision@.service "$root/usr/lib/systemd/system/edgert-provision@.service"
install -D -m 0644 packaging/sysusers.d/edgert.conf "$root/usr/lib/sysusers.d/edgert.conf"
install -D -m 0644 packaging/tmpfiles.d/edgert.conf "$root/usr/lib/tmpfiles.d/edgert.conf"
install -D -m 0644 packaging/edgert.toml "$root/etc/edgert/edgert.toml"
mkdir -p "$root/usr/bin" "$root/usr/share/edgert" "$root/usr/share/doc/edgert"
ln -s "$PREFIX/bin/edgert" "$root/usr/bin/edgert"
ln -s "$site/edgert/data/models" "$root/usr/share/edgert/models"
install -m 0644 README.md "$root/usr/share/doc/edgert/README.md"

mkdir -p "$root/DEBIAN"
size_kb="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@PYVER@/$pyver/" \
    -e "s/@NEXT_PYVER@/$next_pyver/" -e "s/@INSTALLED_SIZE@/$size_kb/" \
    packaging/debian/control.in >"$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
chmod 0755 "$root"

deb="$OUT_DIR/edgert_${version}_${arch}.deb"
echo "== writing $deb"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
