"""The fleet CA (EC P-256, self-signed): signs the TLS client certificates of enrolled devices."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgert.errors import KeyFileError, SecurityError
from edgert.mqtt.topics import check_id
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.keys import load_private_key_file

__all__ = ["CA_DAYS", "DEVICE_CERT_DAYS", "create_ca", "load_ca", "sign_device_csr"]

#: Validity of the fleet CA certificate and of a device certificate.
CA_DAYS = 3650
DEVICE_CERT_DAYS = 825
#: Tolerated clock difference when a certificate starts being valid.
BACKDATE = timedelta(minutes=5)


def create_ca(
    key_path: Path,
    cert_path: Path,
    fleet_id: str,
    *,
    now: datetime | None = None,
    days: int = CA_DAYS,
    fs: FileSystem | None = None,
) -> x509.Certificate:
    """Create the CA key (0600) and its self-signed certificate; never overwrite either."""
    for p in (key_path, cert_path):
        if Path(p).exists():
            raise KeyFileError(f"{p} already exists", hint="a fleet CA is never overwritten")
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgert fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgert fleet {fleet_id} CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    fs = fs or FileSystem()
    ensure_private_dir(Path(key_path).parent)
    fs.atomic_write(
        Path(key_path),
        [
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        ],
        mode=0o600,
        step="ca-key",
    )
    fs.atomic_write(
        Path(cert_path), [cert.public_bytes(serialization.Encoding.PEM)], mode=0o600, step="ca-cert"
    )
    return cert


def load_ca(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key (permission-checked) and certificate."""
    key = load_private_key_file(Path(key_path))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{key_path} is not an EC private key")
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"fleet CA certificate {cert_path} is unreadable: {exc}") from None
    return key, cert


def sign_device_csr(
    key_path: Path,
    cert_path: Path,
    csr_pem: bytes,
    device_id: str,
    *,
    now: datetime | None = None,
    days: int = DEVICE_CERT_DAYS,
) -> bytes:
    """A PEM client certificate for ``device_id`` (CN) over the CSR's key, if the CSR's signature verifies.

    The subject is set by the fleet, not taken from the CSR: the device proves it holds the key, the
    fleet decides its name.
    """
    check_id(device_id, "device id")
    ca_key, ca_cert = load_ca(key_path, cert_path)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise SecurityError(
            "the certificate signing request is not a PEM CSR",
            hint="make it on the device ('DeviceKeys.tls_csr')",
        ) from None
    if not csr.is_signature_valid:
        raise SecurityError("the certificate signing request's signature does not verify")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SecurityError("device TLS keys must be EC P-256")
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
