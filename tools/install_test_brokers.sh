#!/bin/sh
# Install what the test suite runs for real, from Debian/Ubuntu packages: mosquitto (MQTT 5 and 3.1.1)
# and RabbitMQ with its MQTT plugin (3.1.1 compatibility test), mosquitto_sub and socat for the
# end-to-end daemon test, PostgreSQL for the fleet-state tests, and systemd for systemd-analyze (the unit-file checks; PID 1 need not be
# systemd). Needs root (or sudo) when something is missing.
# The packages' services are not used (tests start private brokers on free ports), so nothing is
# started and nothing is enabled at boot: tools/apt_install.sh leaves the machine's services as found.
set -eu
cd "$(dirname "$0")/.."
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
if ! command -v mosquitto_passwd >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    missing="$missing mosquitto-clients"
fi
# socat: the end-to-end test's proxy between the daemon and the broker.
command -v socat >/dev/null 2>&1 || missing="$missing socat"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$missing rabbitmq-server"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
# postgresql: fleet state shared by several controllers (tests run a private, unprivileged cluster).
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$missing postgresql"
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    sh tools/apt_install.sh $missing
fi
mosquitto -h 2>/dev/null | head -n 1 || /usr/sbin/mosquitto -h | head -n 1
echo "rabbitmq-server: $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo missing)"
