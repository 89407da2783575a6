"""Fleet side: everything a mosquitto broker needs for enrollment by claim, written to one directory.

``edgert provision broker-setup`` issues, from the fleet CA, the broker's server certificate and the
fleet controller's client certificate (CN :func:`~edgert.provision.broker_conf.controller_identity`,
in ``controller/``, which stays with the controller), and writes the two ACLs, an empty claim
password file and the listener part of mosquitto.conf
(:func:`~edgert.provision.broker_conf.mosquitto_conf`). Keys are EC P-256, 0600; nothing is
overwritten.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgert.errors import ConfigError, KeyFileError
from edgert.fleet.ca import BACKDATE, DEVICE_CERT_DAYS, load_ca
from edgert.fleet.fleetdir import FleetDir
from edgert.provision.broker_conf import (
    DEFAULT_CLAIM_PORT,
    DEFAULT_DEVICE_PORT,
    BrokerFiles,
    claim_listener_acl,
    controller_identity,
    device_acl,
    mosquitto_conf,
    mosquitto_password_line,
)
from edgert.security.atomic import FileSystem, ensure_private_dir

__all__ = ["BROKER_CERT_DAYS", "BrokerSetup", "set_claim_password", "write_broker_setup"]

#: Validity of the broker's and the controller's certificates (capped by the CA's own).
BROKER_CERT_DAYS = DEVICE_CERT_DAYS


@dataclass(frozen=True)
class BrokerSetup:
    """What :func:`write_broker_setup` wrote (paths in the output directory)."""

    directory: Path
    conf: Path
    files: BrokerFiles  # as the broker will see them (under install_dir)
    controller_cert: Path
    controller_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _issue(fleet: FleetDir, cn: str, *, server_hosts: list[str] | None, now: datetime) -> tuple[bytes, bytes]:
    ca_key, ca_cert = load_ca(fleet.ca_key_path, fleet.ca_cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + timedelta(days=BROKER_CERT_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_broker_setup(
    fleet: FleetDir,
    out: str | Path,
    *,
    hosts: list[str],
    device_port: int = DEFAULT_DEVICE_PORT,
    claim_port: int = DEFAULT_CLAIM_PORT,
    bind: str = "",
    install_dir: str | None = None,
    now: datetime | None = None,
) -> BrokerSetup:
    """Write certificates, ACLs, the claim password file and mosquitto.conf's listeners into ``out``.

    ``hosts`` are the names and addresses devices use to reach the broker (the server certificate's
    SANs). ``install_dir`` is where the files will live on the broker host (default: ``out``).
    """
    if not hosts:
        raise ConfigError("the broker needs at least one host name", hint="pass --host mqtt.example.net")
    out = Path(out)
    names = ("broker.key", "controller", "mosquitto.conf")
    if any((out / n).exists() for n in names):
        raise KeyFileError(
            f"{out} already holds a broker setup", hint="choose a new directory; keys are never overwritten"
        )
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    ensure_private_dir(out)
    fs = FileSystem()
    server_cert, server_key = _issue(fleet, hosts[0], server_hosts=hosts, now=now)
    ctl_cert, ctl_key = _issue(fleet, controller_identity(fleet.id), server_hosts=None, now=now)
    shutil.copyfile(fleet.ca_cert_path, out / "fleet-ca.pem")
    controller = ensure_private_dir(out / "controller")  # stays with the fleet controller, not the broker
    fs.atomic_write(controller / "controller.crt", [ctl_cert], mode=0o644, step="controller.crt")
    fs.atomic_write(controller / "controller.key", [ctl_key], mode=0o600, step="controller.key")
    for name, data, mode in (
        ("broker.crt", server_cert, 0o644),
        ("broker.key", server_key, 0o600),
        ("devices.acl", device_acl(fleet.id).encode(), 0o644),
        ("claims.acl", claim_listener_acl(fleet.id).encode(), 0o644),
        ("claims.passwd", b"", 0o600),
    ):
        fs.atomic_write(out / name, [data], mode=mode, step=name)
    at = Path(install_dir) if install_dir else out.resolve()
    files = BrokerFiles(
        str(at / "fleet-ca.pem"),
        str(at / "broker.crt"),
        str(at / "broker.key"),
        str(at / "claims.passwd"),
        str(at / "devices.acl"),
        str(at / "claims.acl"),
    )
    conf = mosquitto_conf(files, device_port=device_port, claim_port=claim_port, bind=bind)
    fs.atomic_write(out / "mosquitto.conf", [conf.encode()], mode=0o644, step="mosquitto.conf")
    return BrokerSetup(
        out, out / "mosquitto.conf", files, controller / "controller.crt", controller / "controller.key"
    )


def set_claim_password(path: str | Path, claim_id: str, secret: str | None) -> None:
    """Add (or with ``secret=None`` remove) a claim in the broker's claim password file, atomically, 0600.

    mosquitto reads the file again on SIGHUP (``systemctl reload mosquitto``).
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the claim password file {p}: {exc}") from None
    kept = [line for line in lines if line.split(":", 1)[0] != claim_id]
    if secret is not None:
        kept.append(mosquitto_password_line(claim_id, secret))
    text = "".join(line + "\n" for line in kept)
    FileSystem().atomic_write(p, [text.encode()], mode=0o600, step="claims-passwd")
