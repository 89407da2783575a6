#!/bin/sh
# Install Debian/Ubuntu packages for edgert's tools without touching the machine's services.
#   sh tools/apt_install.sh PACKAGE|./FILE.deb ...
# Packages already installed are left alone. During the install a policy-rc.d that forbids every
# service start is in place (the machine's own policy-rc.d, if any, is put back byte for byte), and
# the boot-time enablement that the newly installed packages add (systemd *.wants/*.requires links,
# /etc/rc?.d S links) is undone: a broker installed for the tests does not start now or at boot.
# Needs root; re-runs itself with sudo otherwise.
set -eu
[ "$#" -gt 0 ] || exit 0
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then exec sudo sh "$0" "$@"; fi
    echo "error: installing $* needs root; run as root or install sudo" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found: install these packages with your system's package manager: $*" >&2
    exit 1
fi
# How long to wait for another apt/dpkg run to release its lock.
LOCK_TIMEOUT_S="${EDGERT_APT_LOCK_TIMEOUT_S:-600}"
POLICY=/usr/sbin/policy-rc.d
work="$(mktemp -d)"
had_policy=0

restore() {
    if [ "$had_policy" -eq 1 ]; then
        cp -p "$work/policy-rc.d" "$POLICY"
    else
        rm -f "$POLICY"
    fi
    rm -rf "$work"
}

installed_packages() {
    dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' 2>/dev/null | awk '$1 == "ii" { print $2 }' | sort
}

enablement_links() {
    find /etc/systemd/system -mindepth 2 -maxdepth 2 \( -path '*.wants/*' -o -path '*.requires/*' \) \
        2>/dev/null || true
    for d in /etc/rc0.d /etc/rc1.d /etc/rc2.d /etc/rc3.d /etc/rc4.d /etc/rc5.d /etc/rc6.d /etc/rcS.d; do
        [ -d "$d" ] && find "$d" -mindepth 1 -maxdepth 1 -name 'S*'
    done
    true
}

installed_packages >"$work/pkgs.before"
enablement_links | sort >"$work/links.before"
if [ -e "$POLICY" ]; then
    cp -p "$POLICY" "$work/policy-rc.d"
    had_policy=1
fi
trap restore EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\n# edgert tools/apt_install.sh: no service starts while it installs packages\nexit 101\n' \
    >"$POLICY"
chmod 0755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout="$LOCK_TIMEOUT_S" update -qq
apt-get -o DPkg::Lock::Timeout="$LOCK_TIMEOUT_S" install -y --no-install-recommends "$@"

# Undo the boot-time enablement of services that belong to packages this run installed.
installed_packages >"$work/pkgs.after"
enablement_links | sort >"$work/links.after"
comm -13 "$work/pkgs.before" "$work/pkgs.after" >"$work/pkgs.new"
comm -13 "$work/links.before" "$work/links.after" >"$work/links.new"
: >"$work/units"
: >"$work/scripts"
while read -r pkg; do
    dpkg -L "$pkg" 2>/dev/null | grep -E '^(/usr)?/lib/systemd/system/[^/]+$' | sed 's|.*/||' >>"$work/units" || true
    dpkg -L "$pkg" 2>/dev/null | grep -E '^/etc/init\.d/[^/]+$' | sed 's|.*/||' >>"$work/scripts" || true
done <"$work/pkgs.new"
# sysv scripts: disable, not remove (an upgrade's `update-rc.d defaults` keeps a disabled script disabled).
grep -E '^/etc/rc.\.d/S' "$work/links.new" | sed 's|.*/S[0-9]*||' | sort -u | while read -r script; do
    if grep -qxF "$script" "$work/scripts"; then
        update-rc.d "$script" disable >/dev/null 2>&1 || rm -f /etc/rc?.d/S[0-9][0-9]"$script"
        echo "apt_install: $script (installed just now) will not start at boot"
    fi
done
# systemd units: removing the link keeps deb-systemd-helper's record, so upgrades leave them disabled.
grep -vE '^/etc/rc.\.d/' "$work/links.new" | while read -r link; do
    name="${link##*/}"
    template="$(printf '%s' "$name" | sed 's/@[^.]*\./@./')"  # getty@tty1.service -> getty@.service
    if { grep -qxF "$name" "$work/units" || grep -qxF "$template" "$work/units"; } && [ -L "$link" ]; then
        rm -f "$link"
        echo "apt_install: $name (installed just now) will not start at boot"
    fi
done
