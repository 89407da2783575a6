"""Device profiles: TOML data validated into frozen dataclasses.

A profile says how to detect a hardware class, which onnxruntime execution providers and LiteRT
delegates to try (in order, with options), how many threads to use, which model variants to
prefer and the serving limits. Validation does no I/O: :func:`parse_profile` takes the decoded
TOML and the source name; :func:`load_profile` is the thin adapter that reads the file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DelegateSpec",
    "DetectHints",
    "Limits",
    "Profile",
    "ProfileProblem",
    "ProviderSpec",
    "available_profiles",
    "load_profile",
    "parse_profile",
    "profile_dirs",
    "scan_profiles",
]

SCHEMA_VERSION = 1
VARIANTS = ("int8", "fp16", "fp32", "edgetpu")
ENV_PROFILE_DIR = "EDGERT_PROFILE_DIR"
#: Options onnxruntime provider entries accept: a flat table of scalars.
_SCALAR = (str, int, float, bool)


@dataclass(frozen=True)
class ProviderSpec:
    """One onnxruntime execution provider candidate with its options."""

    name: str
    options: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    label: str = ""

    @property
    def display(self) -> str:
        """Name plus label (e.g. ``OpenVINOExecutionProvider[NPU]``)."""
        return f"{self.name}[{self.label}]" if self.label else self.name


@dataclass(frozen=True)
class DelegateSpec:
    """One LiteRT delegate candidate: a shared library to load with options."""

    name: str
    library: str
    options: Mapping[str, str | int | float | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectHints:
    """Evidence that a device belongs to this hardware class.

    One hit in any of files/devices/cpu_flags/file_contains/usb_ids is enough; every entry of
    ``requires_providers`` must additionally be offered by the installed onnxruntime.
    """

    files: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = ()
    file_contains: tuple[tuple[str, str], ...] = ()
    usb_ids: tuple[str, ...] = ()
    requires_providers: tuple[str, ...] = ()
    priority: int = 0

    @property
    def empty(self) -> bool:
        """True when the profile has no hints (a generic fallback)."""
        return not (
            self.files
            or self.devices
            or self.cpu_flags
            or self.file_contains
            or self.usb_ids
            or self.requires_providers
        )


@dataclass(frozen=True)
class Limits:
    """Serving limits a profile recommends for its hardware."""

    max_batch: int = 32
    max_in_flight: int = 64
    max_queue: int = 256


@dataclass(frozen=True)
class Profile:
    """A validated device profile."""

    name: str
    description: str
    source: str
    detect: DetectHints
    threads: int
    variants: tuple[str, ...]
    providers: tuple[ProviderSpec, ...]
    delegates: tuple[DelegateSpec, ...]
    limits: Limits
    engine_cache: str = "disabled"

    def choose_variant(self, available: list[str] | tuple[str, ...]) -> str | None:
        """The first variant in this profile's preference order that is available."""
        for variant in self.variants:
            if variant in available:
                return variant
        return available[0] if available else None


# --------------------------------------------------------------------------------------------
# Validation (pure)
# --------------------------------------------------------------------------------------------
_TOP_KEYS = {"schema", "name", "description", "detect", "runtime", "onnx", "litert", "limits"}
_DETECT_KEYS = {"files", "devices", "cpu_flags", "file_contains", "usb_ids", "requires_providers", "priority"}
_RUNTIME_KEYS = {"threads", "variants", "engine_cache"}
_ONNX_KEYS = {"providers"}
_PROVIDER_KEYS = {"name", "options", "label"}
_LITERT_KEYS = {"delegates"}
_DELEGATE_KEYS = {"name", "library", "options"}
_LIMIT_KEYS = {"max_batch", "max_in_flight", "max_queue"}
_ENGINE_CACHE = ("disabled", "encrypted")


class _Checker:
    """Small helper that produces errors naming the file, the key and what is allowed."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {key}: {problem}",
            hint="see device_profiles/README.md for the profile schema",
        )

    def table(
        self, doc: Any, key: str, allowed: set[str], required: frozenset[str] | set[str] = frozenset()
    ) -> dict:
        if not isinstance(doc, dict):
            raise self.fail(key, f"must be a table, got {type(doc).__name__}")
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise self.fail(
                f"{key}.{unknown[0]}" if key else unknown[0],
                f"unknown key; allowed keys: {', '.join(sorted(allowed))}",
            )
        missing = sorted(required - set(doc))
        if missing:
            raise self.fail(f"{key}.{missing[0]}" if key else missing[0], "required key is missing")
        return doc

    def typed(self, value: Any, key: str, types: type | tuple[type, ...], what: str) -> Any:
        # bool is an int subclass; never accept it where a number is wanted.
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(key, f"must be {what}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(key, f"must be {what}, got {type(value).__name__} {value!r}")
        return value

    def str_list(self, value: Any, key: str) -> tuple[str, ...]:
        self.typed(value, key, list, "a list of strings")
        for i, item in enumerate(value):
            self.typed(item, f"{key}[{i}]", str, "a string")
        return tuple(value)

    def positive(self, value: Any, key: str, minimum: int = 1) -> int:
        self.typed(value, key, int, "an integer")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return int(value)

    def options(self, value: Any, key: str) -> dict[str, str | int | float | bool]:
        self.typed(value, key, dict, "a table of options")
        for opt, val in value.items():
            if not isinstance(val, _SCALAR):
                raise self.fail(f"{key}.{opt}", "option values must be strings, numbers or booleans")
        return dict(value)


def parse_profile(doc: Mapping[str, Any], source: str) -> Profile:
    """Validate a decoded profile TOML document into a :class:`Profile` (no I/O)."""
    c = _Checker(source)
    doc = c.table(dict(doc), "", _TOP_KEYS, {"schema", "name"})
    schema = c.typed(doc["schema"], "schema", int, "an integer")
    if schema != SCHEMA_VERSION:
        raise c.fail("schema", f"unsupported schema version {schema}; this edgert reads {SCHEMA_VERSION}")
    name = c.typed(doc["name"], "name", str, "a string")
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise c.fail("name", "must be non-empty and use only letters, digits, '-', '_' or '.'")
    description = c.typed(doc.get("description", ""), "description", str, "a string")

    det = c.table(doc.get("detect", {}), "detect", _DETECT_KEYS)
    file_contains: list[tuple[str, str]] = []
    for i, item in enumerate(det.get("file_contains", [])):
        item = c.table(item, f"detect.file_contains[{i}]", {"path", "text"}, {"path", "text"})
        file_contains.append(
            (
                c.typed(item["path"], f"detect.file_contains[{i}].path", str, "a string"),
                c.typed(item["text"], f"detect.file_contains[{i}].text", str, "a string"),
            )
        )
    detect = DetectHints(
        files=c.str_list(det.get("files", []), "detect.files"),
        devices=c.str_list(det.get("devices", []), "detect.devices"),
        cpu_flags=c.str_list(det.get("cpu_flags", []), "detect.cpu_flags"),
        file_contains=tuple(file_contains),
        usb_ids=c.str_list(det.get("usb_ids", []), "detect.usb_ids"),
        requires_providers=c.str_list(det.get("requires_providers", []), "detect.requires_providers"),
        priority=c.typed(det.get("priority", 0), "detect.priority", int, "an integer"),
    )

    rt = c.table(doc.get("runtime", {}), "runtime", _RUNTIME_KEYS)
    threads = c.typed(rt.get("threads", 0), "runtime.threads", int, "an integer (0 = automatic)")
    if threads < 0:
        raise c.fail("runtime.threads", f"must be >= 0 (0 = automatic), got {threads}")
    variants = c.str_list(rt.get("variants", ["int8", "fp32"]), "runtime.variants")
    for i, v in enumerate(variants):
        if v not in VARIANTS:
            raise c.fail(f"runtime.variants[{i}]", f"unknown variant {v!r}; allowed: {', '.join(VARIANTS)}")
    engine_cache = c.typed(rt.get("engine_cache", "disabled"), "runtime.engine_cache", str, "a string")
    if engine_cache not in _ENGINE_CACHE:
        raise c.fail("runtime.engine_cache", f"got {engine_cache!r}; allowed: {', '.join(_ENGINE_CACHE)}")

    onnx = c.table(doc.get("onnx", {}), "onnx", _ONNX_KEYS)
    providers = []
    for i, p in enumerate(onnx.get("providers", [])):
        key = f"onnx.providers[{i}]"
        p = c.table(p, key, _PROVIDER_KEYS, {"name"})
        pname = c.typed(p["name"], f"{key}.name", str, "a string")
        if not pname.endswith("ExecutionProvider"):
            raise c.fail(f"{key}.name", f"{pname!r} is not an onnxruntime provider name (…ExecutionProvider)")
        providers.append(
            ProviderSpec(
                name=pname,
                options=c.options(p.get("options", {}), f"{key}.options"),
                label=c.typed(p.get("label", ""), f"{key}.label", str, "a string"),
            )
        )
    if not providers:
        providers.append(ProviderSpec("CPUExecutionProvider"))

    lite = c.table(doc.get("litert", {}), "litert", _LITERT_KEYS)
    delegates = []
    for i, d in enumerate(lite.get("delegates", [])):
        key = f"litert.delegates[{i}]"
        d = c.table(d, key, _DELEGATE_KEYS, {"name", "library"})
        delegates.append(
            DelegateSpec(
                name=c.typed(d["name"], f"{key}.name", str, "a string"),
                library=c.typed(d["library"], f"{key}.library", str, "a string"),
                options=c.options(d.get("options", {}), f"{key}.options"),
            )
        )

    lim = c.table(doc.get("limits", {}), "limits", _LIMIT_KEYS)
    limits = Limits(
        max_batch=c.positive(lim.get("max_batch", 32), "limits.max_batch"),
        max_in_flight=c.positive(lim.get("max_in_flight", 64), "limits.max_in_flight"),
        max_queue=c.positive(lim.get("max_queue", 256), "limits.max_queue"),
    )
    return Profile(
        name=name,
        description=description,
        source=source,
        detect=detect,
        threads=threads,
        variants=variants,
        providers=tuple(providers),
        delegates=tuple(delegates),
        limits=limits,
        engine_cache=engine_cache,
    )


# --------------------------------------------------------------------------------------------
# Loading (I/O adapter)
# --------------------------------------------------------------------------------------------
def profile_dirs(extra: list[Path] | None = None) -> list[Path]:
    """Directories searched for ``*.toml`` profiles, later ones overriding earlier ones."""
    import os

    from edgert._resources import data_dir

    dirs = [data_dir("device_profiles")]
    dirs.append(Path("/etc/edgert/device_profiles"))
    env = os.environ.get(ENV_PROFILE_DIR)
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.extend(extra or [])
    return dirs


def _read_profile_file(path: Path) -> Profile:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read profile {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_profile(doc, str(path))


@dataclass(frozen=True)
class ProfileProblem:
    """A profile file that was skipped: the file and the validation error, which names the key."""

    path: str
    error: str

    def lines(self) -> list[str]:
        """The error one problem per line (the validator may report several for one file)."""
        return [line.strip() for line in self.error.splitlines() if line.strip()]


_log = logging.getLogger(__name__)


def scan_profiles(extra_dirs: list[Path] | None = None) -> tuple[dict[str, Profile], list[ProfileProblem]]:
    """Every usable profile in :func:`profile_dirs` by name, and every file that was skipped and why.

    One bad file never hides the others: it becomes a :class:`ProfileProblem` and the scan goes on.
    """
    found: dict[str, Profile] = {}
    problems: list[ProfileProblem] = []
    for directory in profile_dirs(extra_dirs):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            try:
                profile = _read_profile_file(path)
            except ConfigError as exc:
                problems.append(ProfileProblem(str(path), exc.message))
                continue
            found[profile.name] = profile
    return found, problems


def _log_skipped(problems: list[ProfileProblem]) -> None:
    for problem in problems:
        _log.warning("skipped device profile file", extra={"path": problem.path, "error": problem.error})


def available_profiles(extra_dirs: list[Path] | None = None) -> dict[str, Profile]:
    """All usable profiles found in :func:`profile_dirs`, by name; bad files are logged and skipped."""
    found, problems = scan_profiles(extra_dirs)
    _log_skipped(problems)
    return found


def load_profile(name_or_path: str | Path, extra_dirs: list[Path] | None = None) -> Profile:
    """Load a profile by name (from the profile directories) or from a ``.toml`` path."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        return _read_profile_file(Path(text))
    profiles, problems = scan_profiles(extra_dirs)
    _log_skipped(problems)
    if text not in profiles:
        hint = "run 'edgert profiles list', or pass a path to a profile .toml file"
        if problems:
            skipped = "; ".join(line for p in problems for line in p.lines())
            hint += f"; skipped profile files: {skipped}"
        raise ConfigError(
            f"unknown device profile {text!r}; available: {', '.join(sorted(profiles)) or 'none'}",
            hint=hint,
        )
    return profiles[text]
