"""Hardware detection: match device profiles against what the machine shows.

Detection reads files and device nodes through a :class:`FileSystemView`, so tests can present a
Jetson, a Coral or a Qualcomm board on any machine. The decision itself is pure: evidence in,
ranked matches with human-readable reasons out (shown by ``edgert doctor``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edgert.profiles import Profile

__all__ = ["DictFileSystem", "FileSystemView", "HostFileSystem", "Match", "detect", "rank_profiles"]

#: Bytes read from any one hint file: /proc/cpuinfo on a 128-core box is ~250 KB.
MAX_HINT_BYTES = 1 << 20


class FileSystemView(Protocol):
    """What detection may look at."""

    def exists(self, path: str) -> bool:
        """True if ``path`` exists (file or device node)."""
        ...

    def read_text(self, path: str) -> str | None:
        """The text of ``path``, or None if it cannot be read."""
        ...

    def glob(self, pattern: str) -> list[str]:
        """Paths matching ``pattern``."""
        ...


class HostFileSystem:
    """The real machine."""

    def exists(self, path: str) -> bool:
        """True if ``path`` exists."""
        return os.path.exists(path)

    def read_text(self, path: str) -> str | None:
        """Up to MAX_HINT_BYTES of ``path`` as text (device-tree strings are NUL-separated)."""
        try:
            with open(path, "rb") as fh:
                return fh.read(MAX_HINT_BYTES).replace(b"\0", b"\n").decode("utf-8", "replace")
        except OSError:
            return None

    def glob(self, pattern: str) -> list[str]:
        """Sorted glob matches."""
        return sorted(glob.glob(pattern))


@dataclass
class DictFileSystem:
    """An in-memory view for tests: ``{path: text}``; a value of None means 'exists, unreadable'."""

    files: Mapping[str, str | None] = field(default_factory=dict)

    def exists(self, path: str) -> bool:
        """True if ``path`` is a key."""
        return path in self.files

    def read_text(self, path: str) -> str | None:
        """The stored text."""
        return self.files.get(path)

    def glob(self, pattern: str) -> list[str]:
        """Keys matching ``pattern``."""
        import fnmatch

        return sorted(p for p in self.files if fnmatch.fnmatch(p, pattern))


@dataclass(frozen=True)
class Match:
    """How one profile fared against the machine."""

    profile: Profile
    matched: bool
    reasons: tuple[str, ...]

    @property
    def score(self) -> int:
        """Priority of a matching profile; -1 when it does not match."""
        return self.profile.detect.priority if self.matched else -1


def _cpu_flags(fs: FileSystemView) -> set[str]:
    text = fs.read_text("/proc/cpuinfo") or ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _usb_ids(fs: FileSystemView) -> set[str]:
    ids = set()
    for vendor_path in fs.glob("/sys/bus/usb/devices/*/idVendor"):
        product_path = vendor_path[: -len("idVendor")] + "idProduct"
        vendor = (fs.read_text(vendor_path) or "").strip().lower()
        product = (fs.read_text(product_path) or "").strip().lower()
        if vendor and product:
            ids.add(f"{vendor}:{product}")
    return ids


def _check(
    profile: Profile, fs: FileSystemView, providers: set[str], flags: set[str], usb: set[str]
) -> Match:
    hints = profile.detect
    if hints.empty:
        return Match(profile, True, ("generic profile: no hardware required",))
    reasons: list[str] = []
    evidence = False

    def category(name: str, items: Iterable[str], found: Sequence[str]) -> None:
        nonlocal evidence
        items = list(items)
        if not items:
            return
        if found:
            evidence = True
            reasons.append(f"{name}: found {', '.join(found)}")
        else:
            reasons.append(f"{name}: none of {', '.join(items)}")

    # Hardware evidence: any one hit in any category is enough (a Coral shows up either as a
    # PCIe device node or as a USB id). Required providers are mandatory on top of that.
    category("files", hints.files, [f for f in hints.files if fs.exists(f)])
    category("devices", hints.devices, [d for d in hints.devices if fs.exists(d)])
    category("cpu flags", hints.cpu_flags, [f for f in hints.cpu_flags if f in flags])
    category("usb ids", hints.usb_ids, [u for u in hints.usb_ids if u.lower() in usb])
    if hints.file_contains:
        hits = [f"{p} contains {t!r}" for p, t in hints.file_contains if t in (fs.read_text(p) or "")]
        category("file contents", [f"{p} contains {t!r}" for p, t in hints.file_contains], hits)
    has_hardware_hints = bool(
        hints.files or hints.devices or hints.cpu_flags or hints.usb_ids or hints.file_contains
    )
    ok = evidence or not has_hardware_hints
    if hints.requires_providers:
        missing = [p for p in hints.requires_providers if p not in providers]
        if missing:
            ok = False
            reasons.append(f"onnxruntime build lacks {', '.join(missing)}")
        else:
            reasons.append(f"providers: {', '.join(hints.requires_providers)} available")
    return Match(profile, ok, tuple(reasons))


def rank_profiles(
    profiles: Iterable[Profile], fs: FileSystemView, available_providers: Iterable[str]
) -> list[Match]:
    """Every profile with whether it matches and why, best match first."""
    providers = set(available_providers)
    flags = _cpu_flags(fs)
    usb = _usb_ids(fs)
    matches = [_check(p, fs, providers, flags, usb) for p in profiles]
    return sorted(matches, key=lambda m: (-m.score, m.profile.name))


def detect(
    profiles: Iterable[Profile],
    fs: FileSystemView | None = None,
    available_providers: Iterable[str] | None = None,
) -> Match:
    """The best matching profile for this machine (``cpu-generic`` when nothing else matches)."""
    if available_providers is None:
        from edgert.backends.onnx import available_providers as ort_available

        available_providers = ort_available()
    ranked = rank_profiles(profiles, fs or HostFileSystem(), available_providers)
    for match in ranked:
        if match.matched:
            return match
    from edgert.errors import ConfigError

    raise ConfigError(
        "no device profile matches this machine and no generic profile is installed",
        hint="reinstall edgert or add device_profiles/cpu-generic.toml",
    )
