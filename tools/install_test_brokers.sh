#!/bin/sh
# Install the real MQTT brokers the test suite starts on loopback: mosquitto (MQTT 5 and 3.1.1) and
# RabbitMQ with its MQTT plugin (3.1.1 compatibility test), plus mosquitto_sub and socat for the
# end-to-end daemon test. Debian/Ubuntu; needs root (or sudo).
# The packages' services are not used: tests run `mosquitto -c FILE` and rabbitmq-server themselves.
set -eu
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v mosquitto_passwd >/dev/null 2>&1 || missing="$missing mosquitto-clients"
command -v mosquitto_sub >/dev/null 2>&1 || missing="$missing mosquitto-clients"
# socat: the end-to-end test's proxy between the daemon and the broker.
command -v socat >/dev/null 2>&1 || missing="$missing socat"
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$missing rabbitmq-server"
if [ -n "$missing" ]; then
    $SUDO apt-get update
    # Do not start the packaged services: tests start private instances on free ports.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
fi
mosquitto -h 2>/dev/null | head -n 1 || /usr/sbin/mosquitto -h | head -n 1
echo "rabbitmq-server: $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo missing)"
