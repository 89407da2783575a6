"""Model versions in the fleet repository: one signed multi-variant package each, published as a TUF target.

A version is the target ``models/<name>/<version>.edgepkg``; its custom metadata (``custom.edgert``)
tells a device what it is before downloading it: name, version, variants with the device profiles
each suits, size, the golden input/output of the health check, and the oldest edgert that reads it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519

from edgert.errors import ConfigError, KeyFileError, ModelError
from edgert.fleet.fleetdir import FleetDir
from edgert.fleet.repository import TufRepository
from edgert.security.keys import fingerprint, load_private_key_file, parse_public_key
from edgert.security.package import (
    Manifest,
    PackageHeader,
    VariantSource,
    check_name,
    create_package,
    parse_version,
    read_header,
)
from edgert.security.trust import load_publisher_key, parse_publisher_key

__all__ = [
    "MAX_GOLDEN_BYTES",
    "ModelTarget",
    "add_model",
    "list_models",
    "model_target_path",
    "profiles_for_variants",
    "target_custom",
]

#: Largest golden input or output file carried in the targets metadata (it travels in every refresh).
MAX_GOLDEN_BYTES = 256 * 1024
#: (format, variant, inputs, outputs) of a model file: ``edgert.backends.describe.describe_file``.
Describer = Callable[[Path], tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]]


def model_target_path(name: str, version: str) -> str:
    """``models/<name>/<version>.edgepkg``."""
    check_name(name)
    parse_version(version)
    return f"models/{name}/{version}.edgepkg"


def profiles_for_variants(variants: Sequence[str]) -> dict[str, list[str]]:
    """variant -> the device profiles (shipped ones) that would pick it from this package."""
    from edgert.profiles import available_profiles

    out: dict[str, list[str]] = {v: [] for v in variants}
    for name, profile in sorted(available_profiles().items()):
        chosen = profile.choose_variant(list(variants))
        if chosen is not None:
            out[chosen].append(name)
    return out


def _golden(golden: tuple[Path, Path] | None) -> dict[str, str] | None:
    if golden is None:
        return None
    out = {}
    for key, path in zip(("inputs", "outputs"), golden, strict=True):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read golden {key} file {path}: {exc.strerror}") from None
        if len(data) > MAX_GOLDEN_BYTES:
            raise ModelError(
                f"golden {key} file {path} is {len(data)} bytes, more than {MAX_GOLDEN_BYTES}",
                hint="use one small sample: it travels in the targets metadata",
            )
        if not data.startswith(b"PK"):
            raise ModelError(f"golden {key} file {path} is not an .npz", hint="save it with numpy.savez")
        out[key] = base64.b64encode(data).decode("ascii")
    return out


def target_custom(manifest: Manifest, size: int, golden: dict[str, str] | None) -> dict[str, Any]:
    """The contract's custom metadata of a model target: ``{"edgert": {...}}``."""
    profiles = profiles_for_variants(manifest.variant_names)
    return {
        "edgert": {
            "name": manifest.name,
            "version": manifest.version,
            "size": size,
            "golden": golden,
            "min_edgert": manifest.min_edgert,
            "variants": [
                {
                    "variant": v.variant,
                    "format": v.format,
                    "size": v.plaintext_size,
                    "profiles": profiles[v.variant],
                }
                for v in manifest.variants
            ],
        }
    }


@dataclass(frozen=True)
class ModelTarget:
    """A published model version: its TUF target path, length, sha256 and custom metadata."""

    target: str
    length: int
    sha256: str
    custom: dict[str, Any]

    @property
    def name(self) -> str:
        """Model name."""
        return str(self.custom.get("edgert", {}).get("name", ""))

    @property
    def version(self) -> str:
        """Model version."""
        return str(self.custom.get("edgert", {}).get("version", ""))


def _describe_file(path: Path) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]:
    from edgert.backends.describe import describe_file

    return describe_file(path)


def _sources(models: Sequence[Path], variants: Sequence[str], describe: Describer) -> list[VariantSource]:
    if variants and len(variants) != len(models):
        raise ConfigError(
            f"{len(variants)} --variant value(s) for {len(models)} model file(s)",
            hint="give one --variant per MODEL, in the same order, or none",
        )
    out: list[VariantSource] = []
    for i, path in enumerate(models):
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist", hint="check the path")
        fmt, guessed, inputs, outputs = describe(path)
        variant = variants[i] if variants else guessed
        if not variants and any(s.variant == variant for s in out):
            variant = f"{guessed}-{fmt}"  # as 'edgert package create' names a clashing guess
        out.append(VariantSource(path, variant, fmt, inputs, outputs))
    return out


def _recipients(fleet: FleetDir, groups: Sequence[str]) -> list[x25519.X25519PublicKey]:
    keys = {
        fingerprint(k): k
        for k in [parse_public_key(fleet.escrow_public)]
        + [parse_public_key(d.x25519) for d in fleet.devices_in(groups)]
    }
    return list(keys.values())


def _check_ready_package(
    fleet: FleetDir, header: PackageHeader, name: str | None, version: str | None
) -> None:
    m = header.manifest
    signer = header.verify_signature()
    if fingerprint(signer) != fingerprint(parse_publisher_key(fleet.publisher_public)):
        raise KeyFileError(
            f"package {m.name} {m.version} is signed by {fingerprint(signer)}, not by this fleet's "
            f"publisher key",
            hint="build it with the fleet publisher key (keys/publisher.pem)",
        )
    escrow = fingerprint(parse_public_key(fleet.escrow_public))
    if not any(isinstance(r, dict) and r.get("recipient") == escrow for r in header.recipients):
        raise KeyFileError(
            f"package {m.name} {m.version} is not wrapped for the fleet escrow key, so devices "
            "enrolled later could never open it",
            hint=f"add '--recipient {fleet.escrow_public}' when you create it",
        )
    if (name and name != m.name) or (version and version != m.version):
        raise ConfigError(
            f"--name/--version ({name} {version}) differ from the package's ({m.name} {m.version})",
            hint="leave them out with --package, or pass the package's own",
        )


def add_model(
    fleet: FleetDir,
    models: Sequence[Path] = (),
    *,
    name: str | None = None,
    version: str | None = None,
    variants: Sequence[str] = (),
    groups: Sequence[str] = (),
    golden: tuple[Path, Path] | None = None,
    package: Path | None = None,
    describe: Describer | None = None,
    min_edgert: str = "0.1.0",
    now: datetime | None = None,
    reference: dict[str, Any] | None = None,
) -> ModelTarget:
    """Build (or take ``package``) a signed package and publish it as ``models/<name>/<version>.edgepkg``.

    The package key is wrapped for the escrow key and every device registered in ``groups``; targets,
    snapshot and timestamp are re-signed. ``describe`` defaults to ``edgert.backends.describe.describe_file``.
    ``reference``: the reference data profile (edgert.drift) signed into a package built here.
    """
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    repo = TufRepository(fleet)
    staging = fleet.targets_dir / "models"
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".add-", suffix=".edgepkg.tmp", dir=staging)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as out:
            if package is not None:
                if models:
                    raise ConfigError("give either MODEL files or --package, not both")
                try:
                    with open(package, "rb") as f:
                        header = read_header(f, str(package))
                        _check_ready_package(fleet, header, name, version)
                        f.seek(0)
                        while block := f.read(1 << 20):
                            out.write(block)
                except OSError as exc:
                    raise ModelError(f"cannot read package {package}: {exc.strerror}") from None
                manifest = header.manifest
            else:
                if not models or not name or not version:
                    raise ConfigError("model add needs MODEL files, --name and --version (or --package FILE)")
                manifest = create_package(
                    _sources(models, variants, describe or _describe_file),
                    out,
                    name=name,
                    version=version,
                    recipients=_recipients(fleet, groups),
                    signer=load_publisher_key(fleet.publisher_key_path),
                    now=now,
                    min_edgert=min_edgert,
                    reference=reference,
                )
            out.flush()
            size = out.tell()
        target = model_target_path(manifest.name, manifest.version)
        custom = target_custom(manifest, size, _golden(golden))
        info = repo.add_target(target, tmp, custom, now)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return ModelTarget(target, info.length, info.hashes["sha256"], custom)


def list_models(fleet: FleetDir) -> list[ModelTarget]:
    """Every published model version, by target path."""
    targets = TufRepository(fleet).targets().targets
    return [
        ModelTarget(path, info.length, info.hashes["sha256"], info.custom or {})
        for path, info in sorted(targets.items())
        if path.startswith("models/")
    ]


def load_escrow_key(fleet: FleetDir) -> x25519.X25519PrivateKey:
    """The fleet escrow private key (permission-checked)."""
    key = load_private_key_file(fleet.escrow_key_path)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyFileError(f"{fleet.escrow_key_path} is not an X25519 private key")
    return key
