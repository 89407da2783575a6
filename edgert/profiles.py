"""Device profiles: TOML data validated into frozen dataclasses.

A profile says how to detect a hardware class, which onnxruntime execution providers and LiteRT
delegates to try (in order, with options), how many threads to use, which model variants to
prefer and the serving limits. Validation does no I/O: :func:`parse_profile` takes the decoded
TOML and the source name; :func:`load_profile` is the thin adapter that reads the file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError
from edgert.tomlschema import Problems, Table

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
    #: onnxruntime session config entries (``SessionOptions.add_session_config_entry``) this
    #: provider's entry asks for, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
    session_config: Mapping[str, str] = field(default_factory=dict)

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

    def choose_variant(self, available: Sequence[str]) -> str | None:
        """The first variant in this profile's preference order that is available."""
        ranked = variant_order(self.variants, available)
        return ranked[0][0] if ranked else None


def variant_order(preferred: Sequence[str], available: Sequence[str]) -> list[tuple[str, str]]:
    """The variants to try, in order, each with the reason it is at that place. Pure.

    A variant id is a kind with an optional suffix (``int8-tflite`` is an ``int8``): kinds are ranked
    by ``preferred`` (a profile's ``variants``), ties keep the package's order, and variants whose kind
    the profile does not list come last.
    """
    kinds = [v.split("-", 1)[0] for v in available]
    ordered: list[tuple[str, str]] = []
    for kind in preferred:
        for variant, k in zip(available, kinds, strict=True):
            if k == kind:
                place = "first" if not ordered else "next"
                ordered.append((variant, f"{place} in the profile's preference order"))
    ordered += [(v, "in the package, not in the profile's preference list")
                for v, k in zip(available, kinds, strict=True) if k not in preferred]
    return ordered


# --------------------------------------------------------------------------------------------
# Validation (pure)
# --------------------------------------------------------------------------------------------
_TOP_KEYS = {"schema", "name", "description", "detect", "runtime", "onnx", "litert", "limits"}
_DETECT_KEYS = {"files", "devices", "cpu_flags", "file_contains", "usb_ids", "requires_providers", "priority"}
_RUNTIME_KEYS = {"threads", "variants", "engine_cache"}
_ONNX_KEYS = {"providers"}
_PROVIDER_KEYS = {"name", "options", "label", "session_config"}
_LITERT_KEYS = {"delegates"}
_DELEGATE_KEYS = {"name", "library", "options"}
_LIMIT_KEYS = {"max_batch", "max_in_flight", "max_queue"}
_ENGINE_CACHE = ("disabled", "encrypted")


PROFILE_HINT = "see device_profiles/README.md for the profile schema"


def _options(table: Table, key: str) -> dict[str, str | int | float | bool]:
    """A flat table of scalar options (what onnxruntime providers and LiteRT delegates accept)."""
    value: dict[str, Any] = table.value(key, dict, {})
    out: dict[str, str | int | float | bool] = {}
    for opt, val in value.items():
        if isinstance(val, _SCALAR):
            out[opt] = val
        else:
            where = f"{table.where(key)}.{opt}"
            table.problems.add(where, "option values must be strings, numbers or booleans")
    return out


def _session_config(table: Table, key: str) -> dict[str, str]:
    """onnxruntime session config entries: dotted keys, values as onnxruntime reads them (strings).

    Booleans become "1"/"0" and integers their decimal text, which is what onnxruntime expects for
    entries such as ``session.intra_op.allow_spinning``.
    """
    value: dict[str, Any] = table.value(key, dict, {})
    out: dict[str, str] = {}
    for entry, val in value.items():
        where = f"{table.where(key)}.{entry}"
        if "." not in entry:
            table.problems.add(where, "is not an onnxruntime session config key "
                               "(they are dotted, e.g. \"session.intra_op.allow_spinning\")")
        elif isinstance(val, bool):
            out[entry] = "1" if val else "0"
        elif isinstance(val, (str, int)):
            out[entry] = str(val)
        else:
            table.problems.add(where, f"must be a string, integer or boolean, got {type(val).__name__}")
    return out


def _parse_detect(det: Table) -> DetectHints:
    file_contains: list[tuple[str, str]] = []
    for item in det.tables("file_contains"):
        path, text = item.string("path", required=True), item.string("text", required=True)
        item.check_unknown()
        file_contains.append((path, text))
    hints = DetectHints(
        files=det.list_of("files", str, what="a string"),
        devices=det.list_of("devices", str, what="a string"),
        cpu_flags=det.list_of("cpu_flags", str, what="a string"),
        file_contains=tuple(file_contains),
        usb_ids=det.list_of("usb_ids", str, what="a string"),
        requires_providers=det.list_of("requires_providers", str, what="a string"),
        priority=det.integer("priority", 0, minimum=None),
    )
    det.check_unknown(_DETECT_KEYS)
    return hints


def _parse_providers(onnx: Table) -> tuple[ProviderSpec, ...]:
    providers = []
    for p in onnx.tables("providers"):
        pname = p.string("name", required=True)
        if pname and not pname.endswith("ExecutionProvider"):
            p.fail("name", f"{pname!r} is not an onnxruntime provider name (…ExecutionProvider)")
        providers.append(
            ProviderSpec(
                name=pname,
                options=_options(p, "options"),
                label=p.string("label"),
                session_config=_session_config(p, "session_config"),
            )
        )
        p.check_unknown(_PROVIDER_KEYS)
    onnx.check_unknown(_ONNX_KEYS)
    return tuple(providers) or (ProviderSpec("CPUExecutionProvider"),)


def _parse_delegates(lite: Table) -> tuple[DelegateSpec, ...]:
    delegates = []
    for d in lite.tables("delegates"):
        delegates.append(
            DelegateSpec(
                name=d.string("name", required=True),
                library=d.string("library", required=True),
                options=_options(d, "options"),
            )
        )
        d.check_unknown(_DELEGATE_KEYS)
    lite.check_unknown(_LITERT_KEYS)
    return tuple(delegates)


def parse_profile(doc: Mapping[str, Any], source: str) -> Profile:
    """Validate a decoded profile TOML document into a :class:`Profile` (no I/O).

    Every problem is collected; the ConfigError raised lists all of them, one per line.
    """
    problems = Problems(source, hint=PROFILE_HINT)
    top = problems.table(dict(doc))
    schema = top.integer("schema", SCHEMA_VERSION, minimum=None) if top.has("schema") else None
    if schema is None:
        top.fail("schema", "is required")
    elif schema != SCHEMA_VERSION:
        top.fail("schema", f"unsupported schema version {schema}; this edgert reads {SCHEMA_VERSION}")
    name = top.string("name", required=True)
    if "name" in top.data and (not name or not all(ch.isalnum() or ch in "-_." for ch in name)):
        top.fail("name", "must be non-empty and use only letters, digits, '-', '_' or '.'")
    description = top.string("description")
    detect = _parse_detect(top.table("detect"))

    rt = top.table("runtime")
    threads = rt.integer("threads", 0, minimum=0)
    variants = rt.list_of("variants", str, ("int8", "fp32"), what="a string")
    for i, v in enumerate(variants):
        if v not in VARIANTS:
            problems.add(f"runtime.variants[{i}]", f"unknown variant {v!r} (allowed: {', '.join(VARIANTS)})")
    engine_cache = rt.choice("engine_cache", "disabled", _ENGINE_CACHE)
    rt.check_unknown(_RUNTIME_KEYS)

    providers = _parse_providers(top.table("onnx"))
    delegates = _parse_delegates(top.table("litert"))
    lim = top.table("limits")
    limits = Limits(
        max_batch=lim.integer("max_batch", 32, minimum=1),
        max_in_flight=lim.integer("max_in_flight", 64, minimum=1),
        max_queue=lim.integer("max_queue", 256, minimum=1),
    )
    lim.check_unknown(_LIMIT_KEYS)
    top.check_unknown(_TOP_KEYS)
    problems.raise_if_any()
    return Profile(
        name=name,
        description=description,
        source=source,
        detect=detect,
        threads=threads,
        variants=variants,
        providers=providers,
        delegates=delegates,
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
