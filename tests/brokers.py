"""Start and stop real MQTT brokers for tests and benchmarks: mosquitto and RabbitMQ (MQTT 3.1.1).

Reusable by later fleet tests. Everything runs on free loopback ports in a private directory; brokers
are stopped by PID (never by name). Certificates are EC P-256, made with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The broker binaries; the EDGERT_TEST_* variables point the tests at other builds (or at nothing).
MOSQUITTO = os.environ.get("EDGERT_TEST_MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
RABBITMQ_SERVER = os.environ.get("EDGERT_TEST_RABBITMQ_SERVER") or "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: Set to 1 (tools/test.sh does) to make a missing broker fail the tests instead of skipping them;
#: CI=true (set by GitHub Actions, GitLab CI and most others) does the same.
ENV_REQUIRE_BROKERS = "EDGERT_REQUIRE_BROKERS"
INSTALL_HINT = "run tools/install_test_brokers.sh (or bash tools/test.sh, which does)"
START_TIMEOUT_S = 10.0
RABBIT_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


def brokers_required() -> bool:
    """True when a missing broker must fail the tests: in CI, or when EDGERT_REQUIRE_BROKERS=1."""
    truthy = ("1", "true", "yes")
    return (
        os.environ.get(ENV_REQUIRE_BROKERS, "").lower() in truthy
        or os.environ.get("CI", "").lower() in truthy
    )


def broker_missing(what: str) -> NoReturn:
    """Skip the calling test because ``what`` is missing; fail it loudly when brokers are required."""
    import pytest

    if brokers_required():
        pytest.fail(
            f"{what} is not installed, and this run requires the real brokers "
            f"({ENV_REQUIRE_BROKERS}=1 or CI=true): {INSTALL_HINT}",
            pytrace=False,
        )
    pytest.skip(f"{what} is not installed; {INSTALL_HINT}")


def mosquitto_installed() -> bool:
    """True if the mosquitto binary the tests use exists and is executable."""
    return os.access(MOSQUITTO, os.X_OK)


def require_mosquitto() -> None:
    """Skip (or, when brokers are required, fail) the calling test unless mosquitto is installed."""
    if not mosquitto_installed():
        broker_missing(f"mosquitto ({MOSQUITTO})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port (or fail with the broker's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


# -- certificates -------------------------------------------------------------------------------
@dataclass
class CA:
    """A test certificate authority (EC P-256)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path

    @classmethod
    def create(cls, directory: Path, name: str = "edgert-test-ca") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, path)

    def issue(
        self, directory: Path, cn: str, *, server: bool = False, expired: bool = False
    ) -> tuple[Path, Path]:
        """Issue a leaf certificate; return (cert_path, key_path) with the key at mode 0600."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        start, end = (
            (now - dt.timedelta(days=10), now - dt.timedelta(days=1))
            if expired
            else (now - dt.timedelta(minutes=5), now + dt.timedelta(days=7))
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(key_path, 0o600)
        return cert_path, key_path

    def sign_csr(self, directory: Path, csr_pem: bytes, *, days: int = 7) -> Path:
        """Issue a client certificate for a device's CSR (its key never leaves it); return the path."""
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid, "CSR signature does not verify"
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        path = directory / f"{cn}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


# -- TCP proxy ----------------------------------------------------------------------------------
@dataclass
class TcpProxy:
    """socat forwarding a free loopback port to ``target_port``: stop it to cut a device off the broker."""

    target_port: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TcpProxy:
        """Start forwarding and wait until the port accepts."""
        self.proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                f"TCP:127.0.0.1:{self.target_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends the forked children too
        )
        wait_port(self.port, START_TIMEOUT_S, self.proc)
        return self

    def stop(self) -> None:
        """Stop the listener and every forwarded connection (the process group we started)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(STOP_TIMEOUT_S)


# -- mosquitto ----------------------------------------------------------------------------------
@dataclass
class Mosquitto:
    """A mosquitto process with a config written from options; restartable on the same port."""

    directory: Path
    port: int = field(default_factory=free_port)
    passwords: dict[str, str] | None = None
    acl: str | None = None
    tls: tuple[Path, Path, Path] | None = None  # (ca, server cert, server key)
    require_certificate: bool = False
    persistence: bool = False
    anonymous: bool = True
    proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        """Write mosquitto.conf for the options above."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Run as ourselves: as root, mosquitto would switch to a user that cannot read our files.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"allow_anonymous {'true' if self.anonymous and not self.passwords else 'false'}",
            # The default (1000) silently drops QoS 1 messages to slow subscribers.
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {d}/",
        ]
        if self.passwords:
            pw = d / "passwd"
            pw.write_text("")
            for user, password in self.passwords.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True
                )
            lines.append(f"password_file {pw}")
        if self.acl is not None:
            acl = d / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        if self.tls:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
            if self.require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        """Start mosquitto and wait until it accepts connections."""
        conf = self.write_config()
        self.log = open(self.directory / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, START_TIMEOUT_S, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(
                "mosquitto did not start: " + (self.directory / "mosquitto.log").read_text()[-2000:]
            ) from exc
        return self

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL) and close the log."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
            self.log.close()

    def kill(self) -> None:
        """Kill abruptly (SIGKILL), as a crash or power loss would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
            self.proc = None
            self.log.close()

    def pause(self) -> None:
        """SIGSTOP: the TCP connection stays up but nothing answers (a network partition)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def wipe_state(self) -> None:
        """Remove persisted state so the next start is a clean broker."""
        for f in self.directory.glob("mosquitto.db*"):
            f.unlink()


#: ACL: a device (its username or certificate CN) writes only under its own devices/{id}/ subtree,
#: reads its own cmd topic; the "fleet" user reads and writes everything.
DEVICE_ACL = """\
user fleet
topic readwrite #

pattern write edgert/v1/+/devices/%u/#
pattern read edgert/v1/+/devices/%u/cmd
"""


# -- RabbitMQ -----------------------------------------------------------------------------------
def rabbitmq_available() -> bool:
    """True if Debian's rabbitmq-server is installed.

    When brokers are required (:func:`brokers_required`) a missing install fails the calling test
    here instead of returning False, so callers that skip on False fail loudly in CI.
    """
    if os.path.exists(RABBITMQ_SERVER) and shutil.which("epmd") is not None:
        return True
    if brokers_required():
        broker_missing(f"rabbitmq-server ({RABBITMQ_SERVER}, with epmd)")
    return False


def require_rabbitmq() -> None:
    """Skip (or, when brokers are required, fail) the calling test unless rabbitmq-server is installed."""
    if not rabbitmq_available():
        broker_missing(f"rabbitmq-server ({RABBITMQ_SERVER}, with epmd)")


@dataclass
class RabbitMQ:
    """A private RabbitMQ node with the MQTT plugin on a free port (MQTT 3.1.1 only)."""

    directory: Path
    mqtt_port: int = field(default_factory=free_port)
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        d = self.directory
        node = f"edgert{self.mqtt_port}@localhost"
        env = dict(os.environ)
        env.update(
            {
                "RABBITMQ_NODENAME": node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
                "HOME": str(d),
            }
        )
        return env

    def start(self) -> RabbitMQ:
        """Start the node and wait for the MQTT listener (about 9 s)."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (d / "rabbitmq.conf").write_text(
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\nmqtt.default_user = guest\nmqtt.default_pass = guest\n"
            "loopback_users = none\n"
        )
        self.log = open(d / "rabbit.out", "ab")
        self.proc = subprocess.Popen(
            [RABBITMQ_SERVER],
            env=self.env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(self.mqtt_port, RABBIT_START_TIMEOUT_S, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError("rabbitmq did not start: " + (d / "rabbit.out").read_text()[-3000:]) from exc
        return self

    def stop(self) -> None:
        """rabbitmqctl stop, then epmd -kill on our private epmd port; kill by PID as a last resort."""
        env = self.env()
        subprocess.run([RABBITMQCTL, "stop"], env=env, capture_output=True, timeout=60)
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
            self.log.close()
        subprocess.run(["epmd", "-kill"], env=env, capture_output=True, timeout=30)


# -- two listeners (provisioning) ------------------------------------------------------------------
@dataclass
class TwoListenerMosquitto(Mosquitto):
    """mosquitto on the listeners ``edgert provision broker-setup`` wrote (``setup_conf``).

    ``port`` is the device listener (mutual TLS against the fleet CA, the device ACL); ``claim_port``
    the claim listener (the claim password file, the claim ACL). Both must match what the setup was
    written with. ``passwords`` are added to the setup's claim password file with mosquitto_passwd.
    """

    setup_conf: Path | None = None
    claim_port: int = field(default_factory=free_port)

    def write_config(self) -> Path:
        """The process settings tests need, then the setup's listener part, unchanged."""
        assert self.setup_conf is not None, "write the setup with edgert.provision.broker_setup first"
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        listeners = self.setup_conf.read_text()
        passwd = next(
            line.split(" ", 1)[1] for line in listeners.splitlines() if line.startswith("password_file ")
        )
        for user, password in (self.passwords or {}).items():
            subprocess.run([MOSQUITTO_PASSWD, "-b", passwd, user, password], check=True, capture_output=True)
        lines = [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "persistence false",
            listeners,
        ]
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> TwoListenerMosquitto:
        """Start and wait until both listeners accept."""
        super().start()
        wait_port(self.claim_port, START_TIMEOUT_S, self.proc)
        return self
