"""Rollout planning: pure decisions, no I/O. Waves, the advance/halt rule and the shadow gate.

The controller hands in what the database knows (device states, clocks) and acts on the returned
:class:`Decision`; nothing here reads a clock, a file or the network, so every rule is tested with
made-up times (tests/fleet/test_planner.py, property-based).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edgert.errors import ConfigError

__all__ = [
    "ACTIVE",
    "DEFAULT_MIN_ATTEMPTS",
    "DEFAULT_WAVES",
    "FAILED_STATES",
    "Decision",
    "DeviceProgress",
    "Policy",
    "ShadowReport",
    "evaluate",
    "parse_duration",
    "parse_fraction",
    "parse_waves",
    "plan_waves",
    "shadow_gate",
]

DEFAULT_WAVES = (0.01, 0.1, 0.5, 1.0)
#: AWS IoT Jobs' ``minNumberOfExecutedThings``: failures are judged as a rate only once this many
#: devices of the rollout have an outcome (or the wave has settled), so one early failure in a large
#: wave does not halt it on a 1-of-2 sample. A canary wave smaller than this is judged when it settles.
DEFAULT_MIN_ATTEMPTS = 10
#: Update event states (FLEET_CONTRACT) that end a device's attempt.
ACTIVE = "active"
FAILED_STATES = frozenset({"failed", "rolled-back"})
MAX_WAVES = 20
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


# -- parsing of operator input --------------------------------------------------------------------
def parse_fraction(text: str | float, what: str = "value") -> float:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05; a number in 0..1 (or a percentage in 0..100%)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{what} {raw!r} is not a number or a percentage",
                          hint=f"write {what} like 5% or 0.05") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{what} {raw!r} is outside 0..100%", hint=f"write {what} like 5% or 0.05")
    return value


def parse_waves(text: str) -> tuple[float, ...]:
    """``"1%,10%,50%,100%"`` -> cumulative fractions, strictly increasing, ending at 1.0."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts or len(parts) > MAX_WAVES:
        raise ConfigError(f"waves {text!r} must list 1..{MAX_WAVES} cumulative percentages",
                          hint="e.g. --waves 1%,10%,50%,100%")
    waves = tuple(parse_fraction(p, "wave") for p in parts)
    if any(b <= a for a, b in itertools.pairwise(waves)) or waves[0] <= 0.0 or waves[-1] != 1.0:
        raise ConfigError(f"waves {text!r} must increase strictly and end at 100%",
                          hint="e.g. --waves 1%,10%,50%,100% (each wave is the share of the group reached)")
    return waves


def parse_duration(text: str | float) -> float:
    """``"5m"`` -> 300.0; units ms, s, m, h, d (seconds without a unit)."""
    m = _DURATION_RE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"duration {text!r} is not understood", hint="write it like 90s, 5m or 1h")
    return float(m.group(1)) * _UNITS[m.group(2)]


# -- waves ----------------------------------------------------------------------------------------
def _rank(device: str, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}\0{device}".encode()).digest()


def plan_waves(
    devices: Iterable[str], waves: Sequence[float] = DEFAULT_WAVES, *, salt: str = ""
) -> list[list[str]]:
    """Assign devices to waves deterministically; returns the new devices of each non-empty wave.

    Devices are ordered by SHA-256 of ``salt`` (the rollout id) and the device id, so the plan does
    not depend on the input order and different rollouts pick different canaries. Wave ``i`` reaches
    ``ceil(waves[i] * n)`` devices in all (at least 1 for the first), and waves that would add nobody
    are dropped, so every returned wave is non-empty and together they hold every device once.
    """
    unique = sorted(set(devices), key=lambda d: (_rank(d, salt), d))
    if not waves or any(not 0.0 < w <= 1.0 for w in waves) or list(waves) != sorted(waves):
        raise ConfigError(f"waves {list(waves)} must be increasing fractions in (0, 1]")
    n = len(unique)
    out: list[list[str]] = []
    done = 0
    for i, frac in enumerate(waves):
        reach = n if i == len(waves) - 1 else min(n, max(1, math.ceil(frac * n - 1e-9)))
        if reach > done:
            out.append(unique[done:reach])
            done = reach
    return out


# -- evaluation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProgress:
    """What the fleet knows about one device of the rollout (from its events and status)."""

    device: str
    state: str | None = None  # last update event state for this rollout; None = nothing yet
    healthy: bool | None = None  # None = not reported
    last_seen: float | None = None  # unix s of the last message from the device
    version: str | None = None  # the version its status says it serves


@dataclass(frozen=True)
class Policy:
    """The operator's rollout limits."""

    wait_healthy_s: float = 300.0
    max_failure_rate: float = 0.05
    min_attempts: int = DEFAULT_MIN_ATTEMPTS


@dataclass(frozen=True)
class Decision:
    """What to do with the current wave: ``advance``, ``wait``, ``halt`` (with ``reason``) or ``complete``."""

    action: str
    reason: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def outcome(p: DeviceProgress, target: str, wave_started: float, now: float, wait_s: float) -> str:
    """``succeeded``, ``failed``, ``timed-out`` or ``pending`` for one device."""
    if p.state in FAILED_STATES or p.healthy is False:
        return "failed"
    if (p.state == ACTIVE and p.healthy is not False) or p.version == target:
        return "succeeded"
    if now - wave_started >= wait_s:
        return "timed-out"
    return "pending"


def evaluate(
    wave: Sequence[DeviceProgress],
    *,
    target_version: str,
    wave_started: float,
    now: float,
    policy: Policy,
    earlier: Sequence[DeviceProgress] = (),
    last_wave: bool = False,
) -> Decision:
    """Decide the current wave's fate. The exact rules, in order:

    * A device has *succeeded* when it reported ``active`` (and not unhealthy) or its status serves
      ``target_version``; it has *failed* on ``failed``/``rolled-back`` or when reported unhealthy.
      Otherwise it is *pending* until ``wait_healthy_s`` has passed since the wave started, then
      *timed-out*. An offline device is therefore never a failure; it only holds the wave back.
    * ``attempted`` = succeeded + failed over the whole rollout (earlier waves and this one);
      ``rate`` = failed / attempted. The wave is *settled* when none of its devices is pending.
    * **halt** when failed >= 1 and rate > ``max_failure_rate`` and (attempted >= ``min_attempts`` or
      the wave is settled) — AWS IoT Jobs' abort criteria with ``minNumberOfExecutedThings``, and
      hawkBit's error threshold acting as an emergency shutdown.
    * **halt** when the wave is settled and none of its devices succeeded (all timed out): nothing
      shows the version works, so the rollout does not widen.
    * **complete** when the wave is settled and it is the last one; **advance** when settled;
      **wait** otherwise.
    """
    ws, wt = wave_started, policy.wait_healthy_s
    here = [outcome(p, target_version, ws, now, wt) for p in wave]
    # Earlier waves were settled when they advanced; a late straggler there may still report.
    before = [outcome(p, target_version, ws, now, float("inf")) for p in earlier]
    counts = {k: here.count(k) for k in ("succeeded", "failed", "timed-out", "pending")}
    failed = counts["failed"] + before.count("failed")
    attempted = failed + counts["succeeded"] + before.count("succeeded")
    counts.update(attempted=attempted, failed_total=failed)
    settled = counts["pending"] == 0
    rate = failed / attempted if attempted else 0.0
    if failed and rate > policy.max_failure_rate and (attempted >= policy.min_attempts or settled):
        return Decision("halt", f"failure rate {failed}/{attempted} = {rate:.1%} exceeds "
                                f"{policy.max_failure_rate:.1%}", counts)
    if not settled:
        return Decision("wait", f"{counts['pending']} of {len(wave)} devices pending", counts)
    if wave and counts["succeeded"] == 0:
        return Decision("halt", f"no device of the wave became active within {wt:g} s "
                                f"({counts['timed-out']} timed out)", counts)
    return Decision("complete" if last_wave else "advance", "", counts)


# -- shadow gate ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowReport:
    """One device's shadow evaluation: agreement in 0..1, new/old latency ratio, samples compared."""

    device: str
    agreement: float
    latency_ratio: float
    samples: int


def shadow_gate(
    reports: Sequence[ShadowReport],
    *,
    expected: int,
    min_agreement: float,
    max_latency_ratio: float,
    min_samples: int = 1,
) -> Decision:
    """Promote only when every one of ``expected`` devices reported >= ``min_samples`` samples and the
    sample-weighted mean agreement >= ``min_agreement`` and the sample-weighted mean latency ratio
    <= ``max_latency_ratio``; ``halt`` when all reported and a bound is missed, else ``wait``."""
    usable = [r for r in reports if r.samples >= min_samples and math.isfinite(r.agreement)
              and math.isfinite(r.latency_ratio)]
    counts = {"reported": len(usable), "expected": expected}
    if len(usable) < expected or not usable:
        return Decision("wait", f"{len(usable)} of {expected} devices reported shadow results", counts)
    total = sum(r.samples for r in usable)
    agreement = sum(r.agreement * r.samples for r in usable) / total
    ratio = sum(r.latency_ratio * r.samples for r in usable) / total
    if agreement < min_agreement:
        return Decision("halt", f"shadow agreement {agreement:.4f} < {min_agreement:g}", counts)
    if ratio > max_latency_ratio:
        return Decision("halt", f"shadow latency ratio {ratio:.3f} > {max_latency_ratio:g}", counts)
    return Decision("advance", f"shadow agreement {agreement:.4f}, latency ratio {ratio:.3f}", counts)
