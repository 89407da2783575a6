"""Per-device wrapped-key records: the package key of a published model, wrapped for a device enrolled later.

The controller unwraps the package key with the fleet escrow key (a recipient of every package)
and wraps it to the device's X25519 key with :func:`edgert.security.envelope.wrap_key`, bound to the
package's manifest binding, so a record opens that package only and only on that device. The
``record`` field is a regular wrapped-key record: the device appends it to the package header's
``recipients`` (they sit outside the publisher's signature) before installing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.errors import ModelError
from edgert.fleet.fleetdir import FleetDir
from edgert.fleet.repo_models import load_escrow_key
from edgert.fleet.repository import TufRepository
from edgert.security import envelope
from edgert.security.keys import parse_public_key
from edgert.security.package import read_header

__all__ = ["KEY_RECORD_VERSION", "wrapped_key_record"]

KEY_RECORD_VERSION = 1


def wrapped_key_record(
    fleet_dir: FleetDir | str | Path, device_id: str, target_path: str, *, suite: str | None = None
) -> dict[str, Any]:
    """A key record: ``{v, target, device, model, version, manifest_sha256, record}``.

    Raises ConfigError for an unknown device or target; the escrow unwrap fails opaquely
    (IntegrityError) if the package was not wrapped for the escrow key.
    """
    fleet = fleet_dir if isinstance(fleet_dir, FleetDir) else FleetDir.open(fleet_dir)
    device = fleet.device(device_id)
    path = TufRepository(fleet).target_file(target_path)
    try:
        with open(path, "rb") as f:
            header = read_header(f, target_path)
    except OSError as exc:
        raise ModelError(
            f"cannot read target {target_path}: {exc.strerror}", hint="the repository directory is incomplete"
        ) from None
    key = header.key_for(load_escrow_key(fleet))
    record = envelope.wrap_key(key, parse_public_key(device.x25519), header.manifest.binding, suite)
    m = header.manifest
    return {
        "v": KEY_RECORD_VERSION,
        "target": target_path,
        "device": device.device,
        "model": m.name,
        "version": m.version,
        "manifest_sha256": m.digest,
        "record": record,
    }
