"""Claims and the enrollment handler (pure claim logic with a moved clock; the handler over real files)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgert.fleet.enrollment import (
    ClaimError,
    EnrollmentHandler,
    check_claim,
    create_claim,
    enroll_request_topic,
    load_claim,
    revoke_claim,
)
from edgert.fleet.fleetdir import FleetDir
from edgert.fleet.repo_init import init_fleet
from edgert.security.keys import DeviceKeys, format_public_key

NOW = datetime(2027, 3, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetDir:
    return init_fleet(tmp_path_factory.mktemp("f") / "fleet", fleet_id="f1", now=NOW).fleet


def _request(claim_id: str, secret: str, device: str, groups: list[str] | None = None) -> bytes:
    keys = DeviceKeys.generate()
    return json.dumps(
        {
            "v": 1,
            "nonce": device,
            "device": device,
            "groups": groups or ["default"],
            "csr": keys.tls_csr(device).decode(),
            "x25519": format_public_key(keys.wrap_public),
            "secret": secret,
        }
    ).encode()


def _enroll(handler: EnrollmentHandler, claim_id: str, secret: str, device: str, **kw: Any) -> dict[str, Any]:
    out: list[bytes] = []
    handler.handle(
        enroll_request_topic("f1", claim_id),
        _request(claim_id, secret, device, **kw),
        lambda t, p, r: out.append(p),
    )
    assert len(out) == 1
    return dict(json.loads(out[0]))


def test_claim_checks_with_moved_clock(fleet: FleetDir) -> None:
    claim, secret = create_claim(fleet, groups=["default"], lifetime=timedelta(days=7), uses=2, now=NOW)
    check_claim(claim, secret, fleet="f1", groups=["default"], now=NOW)
    with pytest.raises(ClaimError, match="expired on 2027-03-08"):
        check_claim(claim, secret, fleet="f1", groups=["default"], now=NOW + timedelta(days=7))
    with pytest.raises(ClaimError, match="wrong secret"):
        check_claim(claim, secret + "x", fleet="f1", groups=["default"], now=NOW)
    with pytest.raises(ClaimError, match="belongs to fleet f1, not f2"):
        check_claim(claim, secret, fleet="f2", groups=["default"], now=NOW)
    with pytest.raises(ClaimError, match="does not allow groups"):
        check_claim(claim, secret, fleet="f1", groups=["canary"], now=NOW)
    stored = json.loads((fleet.path / "claims" / f"{claim.id}.json").read_text())
    assert secret not in json.dumps(stored)  # only the hash is kept
    assert oct((fleet.path / "claims" / f"{claim.id}.json").stat().st_mode & 0o777) == "0o600"


def test_handler_enrolls_then_refuses_used_up_and_revoked(fleet: FleetDir) -> None:
    claim, secret = create_claim(fleet, groups=["default"], lifetime=timedelta(days=7), uses=2, now=NOW)
    h = EnrollmentHandler(fleet, clock=lambda: NOW)
    a = _enroll(h, claim.id, secret, "dev-1")
    assert a["ok"] and "BEGIN CERTIFICATE" in a["cert"] and fleet.device("dev-1").groups == ("default",)
    assert _enroll(h, claim.id, secret, "dev-1")["ok"]  # a repeat (lost answer) does not use it twice
    assert load_claim(fleet, claim.id).uses == 1
    assert _enroll(h, claim.id, secret, "dev-2")["ok"]
    used = _enroll(h, claim.id, secret, "dev-3")
    assert not used["ok"] and "used up (2 of 2" in used["error"]
    other, secret2 = create_claim(fleet, groups=["default"], lifetime=timedelta(days=7), uses=5, now=NOW)
    revoke_claim(fleet, other.id)
    revoked = _enroll(h, other.id, secret2, "dev-4")
    assert not revoked["ok"] and "revoked" in revoked["error"]
    wrong_group = _enroll(h, claim.id, secret, "dev-5", groups=["canary"])
    assert not wrong_group["ok"]
    assert h.counters["refused"] == 3 and not (fleet.devices_dir / "dev-4.json").exists()


def test_handler_ignores_other_fleets_and_malformed(fleet: FleetDir) -> None:
    h = EnrollmentHandler(fleet, clock=lambda: NOW)
    out: list[bytes] = []
    h.handle("edgert/v1/f2/enroll/claim-x/request", b"{}", lambda t, p, r: out.append(p))
    h.handle("edgert/v1/f1/enroll/claim-x/request", b"not json", lambda t, p, r: out.append(p))
    h.handle("edgert/v1/f1/enroll/claim-x/request", b"x" * 20000, lambda t, p, r: out.append(p))
    assert out == [] and h.counters["malformed"] == 2
    assert h.topics("f1") == ["edgert/v1/f1/enroll/+/request"]


def test_wrong_fleet_bundle_is_refused_by_the_agent(tmp_path: Path, fleet: FleetDir) -> None:
    """A device configured for fleet f1 given a claim of another fleet: the controller of f1 refuses it."""
    other = init_fleet(tmp_path / "other", fleet_id="f2", now=NOW).fleet
    claim, secret = create_claim(other, groups=["default"], lifetime=timedelta(days=7), uses=5, now=NOW)
    h = EnrollmentHandler(fleet, clock=lambda: NOW)
    # the claim exists in f2 only: f1 does not know it
    answer = _enroll(h, claim.id, secret, "dev-9")
    assert not answer["ok"] and "unknown claim" in answer["error"]
