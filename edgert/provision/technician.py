"""The technician's flow: every step over one session, reported through callbacks (no drawing here)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.provision.bundle import Bundle
from edgert.provision.session import HostSession, Progress

__all__ = ["FlowReport", "StepHook", "run_flow"]

#: step_hook(step, "start" | "ok" | "fail", detail)
StepHook = Callable[[str, str, dict[str, Any]], None]


@dataclass
class FlowReport:
    """What the final summary shows."""

    device_id: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)
    cert_fingerprint: str | None = None
    enrolled: bool = False
    broker_reachable: bool | None = None
    broker_credential: str | None = None
    selftest_latency_ms: float | None = None
    provider: str | None = None
    installed: str | None = None
    seconds: float = 0.0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    resends: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)


def run_flow(
    host: HostSession,
    bundle: Bundle,
    *,
    device_id: str | None = None,
    groups: list[str] | None = None,
    package: Path | None = None,
    finish: bool = True,
    on_step: StepHook | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FlowReport:
    """info → keys → configure → enroll → selftest → [install] → finish; raises at the first failure."""
    report, t0 = FlowReport(), clock()
    hook = on_step or (lambda *_: None)

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        hook(name, "start", {})
        s0 = clock()
        try:
            out = fn()
        except Exception as exc:
            hook(name, "fail", {"error": str(exc)})
            report.steps.append({"step": name, "ok": False, "error": str(exc)})
            raise
        report.steps.append({"step": name, "ok": True, "seconds": round(clock() - s0, 3)})
        hook(name, "ok", out)
        return out

    step("hello", host.hello)
    info = step("info", lambda: host.request("info"))
    device = device_id or info.get("device_id") or _default_id(info)
    keys = step("keys", lambda: host.request("keys", {"device_id": device}))
    report.device_id = device
    report.fingerprints = {k: v for k, v in keys.items() if k.endswith("fingerprint")}
    step(
        "configure",
        lambda: host.request(
            "configure", {"bundle": bundle.device_public(), "groups": groups or list(bundle.groups)}
        ),
    )
    enr = step(
        "enroll",
        lambda: host.request("enroll", {"claim_id": bundle.claim_id, "claim_secret": bundle.claim_secret}),
    )
    report.enrolled, report.cert_fingerprint = bool(enr.get("enrolled")), enr.get("cert_fingerprint")
    st = step("selftest", lambda: host.request("selftest"))
    report.selftest_latency_ms, report.provider = st.get("latency_ms_p50"), st.get("provider")
    # The selftest connects with the credential the device will keep using (its own certificate once
    # enrolled), so its answer is the one reported; enrollment's round trip only stands in when the
    # selftest did not check the broker.
    reached = st.get("broker_reachable", enr.get("broker_reachable"))
    report.broker_reachable = None if reached is None else bool(reached)
    report.broker_credential = st.get("credential")
    if package is not None:
        data = Path(package).read_bytes()

        def install() -> dict[str, Any]:
            x0 = clock()
            begin = host.send_file(Path(package).name, data, progress=progress)
            report.transfer_bytes = len(data) - int(begin.get("offset", 0))
            report.transfer_seconds = clock() - x0
            return host.request("install_commit")

        inst = step("install", install)
        report.installed = f"{inst.get('model')} {inst.get('version')}"
    if finish:
        step("finish", lambda: host.request("finish"))
    report.seconds, report.resends = clock() - t0, host.resends
    return report


def _default_id(info: dict[str, Any]) -> str:
    import re

    base = str(info.get("serial") or info.get("hostname") or "device")
    return re.sub(r"[^A-Za-z0-9._-]", "-", base)[:64] or "device"
