"""Where edgert keeps its state on a device. One place, overridable by environment or argument."""

from __future__ import annotations

import os
from pathlib import Path

#: Default state directory (systemd's StateDirectory=edgert gives /var/lib/edgert).
DEFAULT_STATE_DIR = Path("/var/lib/edgert")
#: Default runtime directory for sockets (systemd's RuntimeDirectory=edgert).
DEFAULT_RUNTIME_DIR = Path("/run/edgert")
ENV_STATE_DIR = "EDGERT_STATE_DIR"


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: the argument, else ``$EDGERT_STATE_DIR``, else /var/lib/edgert."""
    if override:
        return Path(override)
    env = os.environ.get(ENV_STATE_DIR) or os.environ.get("STATE_DIRECTORY")
    if env:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(env.split(":")[0])
    return DEFAULT_STATE_DIR


def keys_dir(root: Path) -> Path:
    """Device keys (0700 directory, 0600 files)."""
    return root / "keys"


def store_dir(root: Path) -> Path:
    """Encrypted model store."""
    return root / "models"


def audit_dir(root: Path) -> Path:
    """Hash-chained audit log."""
    return root / "audit"


def spool_path(root: Path) -> Path:
    """SQLite telemetry spool."""
    return root / "spool" / "telemetry.sqlite"


def capture_dir(root: Path) -> Path:
    """Sealed data captures."""
    return root / "capture"
