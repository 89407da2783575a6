"""Telemetry documents: per-model stats from the metrics snapshot plus device health.

:func:`build_telemetry` is pure (values in, JSON bytes out, split so every message stays under
:data:`MAX_MESSAGE_BYTES`). :class:`DeviceStats` is the small I/O adapter that reads /proc and
/sys; its paths are injectable for tests.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_MESSAGE_BYTES", "TELEMETRY_VERSION", "DeviceStats", "build_telemetry"]

TELEMETRY_VERSION = 1
#: Well under AWS IoT Core's 128 KB limit, leaving room for MQTT 5 properties and a replay flag.
MAX_MESSAGE_BYTES = 64 * 1024


def _jsonable(value: Any) -> Any:
    """Drop NaN/inf (not JSON) and anything that is not a plain JSON value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _dump(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def build_telemetry(
    *,
    device: str,
    boot_id: str,
    seq: int,
    ts: float,
    interval_s: float,
    models: Mapping[str, Mapping[str, Any]],
    device_stats: Mapping[str, Any],
    sync_stats: Mapping[str, Any],
    audit: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> list[bytes]:
    """Return one or more telemetry payloads; models are split across parts to fit ``max_bytes``.

    A model whose own stats exceed the limit loses its (large, optional) ``latency_sketch``, then, if
    still too large, every non-scalar field; it is marked ``"truncated": true``.
    """
    base = {
        "v": TELEMETRY_VERSION,
        "device": device,
        "boot": boot_id,
        "seq": seq,
        "ts": round(ts, 3),
        "interval_s": interval_s,
        "device_stats": _jsonable(device_stats),
        "sync": _jsonable(sync_stats),
    }
    if audit is not None:  # the signed audit head: the fleet keeps a copy to detect a rolled-back log
        base["audit"] = _jsonable(audit)
    overhead = len(_dump({**base, "models": {}, "part": 999, "parts": 999}))
    budget = max_bytes - overhead
    parts: list[dict[str, Any]] = [{}]
    used = 0
    for name, stats in sorted(models.items()):
        entry = _jsonable(stats)
        size = len(_dump({name: entry}))
        if size > budget:
            entry = {k: v for k, v in entry.items() if k != "latency_sketch"}
            entry["truncated"] = True
            size = len(_dump({name: entry}))
        if size > budget:
            # Still too big (e.g. thousands of error reasons): keep only the scalar fields.
            entry = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
            size = len(_dump({name: entry}))
        if used + size > budget and parts[-1]:
            parts.append({})
            used = 0
        parts[-1][name] = entry
        used += size
    if len(parts) == 1:
        return [_dump({**base, "models": parts[0]})]
    return [_dump({**base, "models": p, "part": i, "parts": len(parts)}) for i, p in enumerate(parts)]


@dataclass
class DeviceStats:
    """Reads CPU, RSS, load, temperature and free disk from /proc and /sys (Linux)."""

    disk_path: str = "/"
    proc: str = "/proc"
    thermal_glob: str = "/sys/class/thermal/thermal_zone*"
    _last_cpu: tuple[float, float] | None = field(default=None, repr=False)

    def read(self) -> dict[str, Any]:
        """A fresh reading; fields that cannot be read are None rather than an error."""
        return {
            "cpu_percent": self._cpu_percent(),
            "rss_bytes": self._rss(),
            "load": self._load(),
            "temp_c": self._temps(),
            "disk_free_bytes": self._disk_free(),
        }

    def _cpu_percent(self) -> float | None:
        """Whole-machine CPU busy percent since the previous reading."""
        try:
            fields_ = Path(self.proc, "stat").read_text().split("\n", 1)[0].split()[1:]
            values = [float(x) for x in fields_]
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        total = sum(values)
        last, self._last_cpu = self._last_cpu, (total, idle)
        if last is None or total <= last[0]:
            return None
        return round(100.0 * (1.0 - (idle - last[1]) / (total - last[0])), 1)

    def _rss(self) -> int | None:
        try:
            pages = int(Path(self.proc, "self", "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE")

    def _load(self) -> list[float] | None:
        try:
            return [round(x, 2) for x in os.getloadavg()]
        except OSError:
            return None

    def _temps(self) -> dict[str, float] | None:
        temps: dict[str, float] = {}
        for zone in sorted(glob.glob(self.thermal_glob)):
            try:
                kind = Path(zone, "type").read_text().strip() or Path(zone).name
                temps[kind[:32]] = int(Path(zone, "temp").read_text().strip()) / 1000.0
            except (OSError, ValueError):
                continue
        return temps or None

    def _disk_free(self) -> int | None:
        try:
            return shutil.disk_usage(self.disk_path).free
        except OSError:
            return None
