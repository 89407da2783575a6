"""The two-listener mosquitto configuration a fleet with enrollment by claim needs (pure text).

mosquitto 2.0 cannot take certificate clients and password clients on one listener, so the broker
runs two (``per_listener_settings true``):

- the **device** listener: mutual TLS against the fleet CA, certificate CN = device id = MQTT
  username (``use_identity_as_username``), with the device ACL (:func:`device_acl`): a device
  writes only under its own ``devices/{id}/`` subtree; the fleet controller (:func:`controller_identity`,
  a name no device id can take) reads and writes the whole fleet;
- the **claim** listener: TLS with the server certificate only, username = claim id and password =
  claim secret (a password-file entry per claim), with :func:`edgert.fleet.enrollment.claim_acl`: a
  claim holder may publish its enrollment request and read its reply, nothing else.

docs/provisioning.md shows the result; the tests run mosquitto on exactly this text.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

from edgert.fleet.enrollment import claim_acl
from edgert.mqtt.topics import PREFIX, check_id

__all__ = [
    "DEFAULT_CLAIM_PORT",
    "DEFAULT_DEVICE_PORT",
    "BrokerFiles",
    "claim_listener_acl",
    "controller_identity",
    "device_acl",
    "mosquitto_conf",
    "mosquitto_password_line",
]

DEFAULT_DEVICE_PORT = 8883
DEFAULT_CLAIM_PORT = 8884
#: mosquitto 2.0's password hash ($7$: PBKDF2-HMAC-SHA512), its default iterations and salt size.
PASSWORD_ITERATIONS = 101
PASSWORD_SALT_BYTES = 12


def controller_identity(fleet: str) -> str:
    """The fleet controller's certificate CN and MQTT username, ``edgert-controller@{fleet}``.

    ``@`` is not allowed in a device id, so no enrolling device can be given this name.
    """
    return f"edgert-controller@{check_id(fleet, 'fleet id')}"


def device_acl(fleet: str) -> str:
    """The device listener's ACL: each device its own subtree; the controller the whole fleet."""
    base = f"{PREFIX}/{check_id(fleet, 'fleet id')}"
    return (
        f"pattern write {base}/devices/%u/#\n"
        f"pattern read {base}/devices/%u/cmd\n"
        f"pattern read {base}/devices/%u/assignment\n"
        f"pattern read {base}/devices/%u/repo\n"
        f"pattern write {base}/repo/req/%u\n"
        f"pattern read {base}/groups/+/deployment\n"
        "\n"
        f"user {controller_identity(fleet)}\n"
        f"topic readwrite {base}/#\n"
    )


@dataclass(frozen=True)
class BrokerFiles:
    """Where the broker finds its certificates, password file and ACLs."""

    fleet_ca: str  # the fleet CA certificate (FLEET/keys/ca.pem): verifies device certificates
    cert: str  # the broker's server certificate
    key: str  # its private key
    passwords: str  # claim id -> claim secret (mosquitto_passwd)
    device_acl: str
    claim_acl: str


def mosquitto_conf(
    files: BrokerFiles,
    *,
    device_port: int = DEFAULT_DEVICE_PORT,
    claim_port: int = DEFAULT_CLAIM_PORT,
    bind: str = "",
    claim_tls: bool = True,
) -> str:
    """The listener part of mosquitto.conf (``bind`` empty: every interface)."""
    at = f" {bind}" if bind else ""
    tls = [f"certfile {files.cert}", f"keyfile {files.key}", "tls_version tlsv1.2"]
    lines = [
        "per_listener_settings true",
        "",
        "# devices: mutual TLS; certificate CN = device id = MQTT username",
        f"listener {device_port}{at}",
        f"cafile {files.fleet_ca}",
        *tls,
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {files.device_acl}",
        "",
        "# enrollment claims: username = claim id, password = claim secret; enrollment topics only",
        f"listener {claim_port}{at}",
        *(tls if claim_tls else []),
        "allow_anonymous false",
        f"password_file {files.passwords}",
        f"acl_file {files.claim_acl}",
    ]
    return "\n".join(lines) + "\n"


def claim_listener_acl(fleet: str) -> str:
    """The claim listener's ACL (:func:`edgert.fleet.enrollment.claim_acl`)."""
    return claim_acl(check_id(fleet, "fleet id"))


def mosquitto_password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    """One password-file line as ``mosquitto_passwd`` writes it (``user:$7$101$salt$hash``)."""
    if ":" in user or "\n" in user:
        raise ValueError("a mosquitto user name cannot hold ':' or a newline")
    salt = salt if salt is not None else secrets.token_bytes(PASSWORD_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWORD_ITERATIONS)
    b64 = base64.b64encode
    return f"{user}:$7${PASSWORD_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"
