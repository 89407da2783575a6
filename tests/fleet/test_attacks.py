"""Issue 11 attacks, end to end against a real broker: the device's updater (python-tuf over MQTT, the
store's origin check, the Deployer) refuses each one, and the version it serves never changes.

The attacker here controls the repository files the controller serves (a compromised mirror or
controller host) but not the fleet's TUF keys, publisher key or command key.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgert.security.package import create_package
from tests.brokers import Mosquitto
from tests.fleet.test_transport_kit import (
    fleet_broker,  # noqa: F401 - fixture
    wait_for,
)
from tests.fleet.test_updater_e2e import NOW, Rig
from tests.security.kit import MODELS, source

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def rig(tmp_path: Path, fleet_broker: Mosquitto) -> Iterator[Rig]:  # noqa: F811
    r = Rig(tmp_path, fleet_broker)
    try:
        yield r
    finally:
        r.close()


def _metadata(rig: Rig) -> Path:
    return rig.repo.dir / "metadata"


def _refused(rig: Rig, seq: int, *reason_parts: str) -> None:
    assert rig.device.wait_final(seq) == "failed"
    reason = rig.device.events[-1].get("reason", "")
    assert any(part in reason for part in reason_parts), reason
    assert rig.device.served() == ("1", "1")
    assert rig.device.store.entry("digits").installed == ["1"]


def test_a_frozen_repository_is_refused(rig: Rig) -> None:
    """Stale timestamp metadata replayed by an attacker (freeze): it has expired, so no update applies."""
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    ts = rig.repo.md["timestamp"]
    ts.signed.expires = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    ts.signed.version += 1
    rig.repo._write("timestamp")  # signed by the real key: only its age gives it away
    rig.deploy(1, "2")
    # an expired timestamp is transient for the updater (the fleet refreshes it): it retries, never installs
    wait_for(lambda: rig.device.updater is not None and rig.device.updater.job is not None
             and "expired" in str(rig.device.updater.job.get("error", "")), what="the expiry to be noticed")
    assert rig.device.served() == ("1", "1")
    assert rig.device.store.entry("digits").installed == ["1"]


def test_an_old_snapshot_under_a_new_name_is_refused(rig: Rig) -> None:
    """Mix-and-match: the attacker serves an older snapshot where the timestamp points to the new one."""
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    version = rig.repo.md["snapshot"].signed.version
    shutil.copy(_metadata(rig) / f"{version - 1}.snapshot.json", _metadata(rig) / f"{version}.snapshot.json")
    rig.deploy(1, "2")
    _refused(rig, 1, "TUF refused", "Mismatch", "Version")


def test_a_higher_version_with_a_bad_signature_is_refused(rig: Rig) -> None:
    """A forged timestamp (higher version, signed by the attacker's own key) is refused."""
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    path = _metadata(rig) / "timestamp.json"
    md = Metadata.from_bytes(path.read_bytes())
    md.signed.version += 10
    from securesystemslib.signer import CryptoSigner

    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    path.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    rig.deploy(1, "2")
    _refused(rig, 1, "TUF refused", "Unsigned", "signature")


def test_a_package_signed_by_another_publisher_is_refused(rig: Rig) -> None:
    """A target listed by (compromised) targets metadata but built by someone outside the fleet."""
    other = ed25519.Ed25519PrivateKey.generate()
    out = io.BytesIO()
    create_package([source(MODELS / "digits_large_int8.onnx")], out, name="digits", version="2",
                   recipients=[rig.device.keys.wrap_public], signer=other, now=NOW, chunk_size=4096)
    rig.repo.add_target("models/digits/2.edgepkg", out.getvalue(),
                        custom={"edgert": {"name": "digits", "version": "2"}})
    rig.deploy(1, "2")
    _refused(rig, 1, "does not trust")


def test_a_rollback_needs_the_fleet_command_key(rig: Rig) -> None:
    """After 2 serves, an older version is offered: as a replayed old document (lower seq) and as a new
    document signed by an attacker's key. Both are ignored; only the fleet can order a rollback."""
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "active"
    rig.add_package("1.5", MODELS / "digits_small_fp32.onnx")
    assert rig.device.updater is not None
    applied = rig.device.updater.applied_seq
    rig.deploy(0, "1.5")  # a replayed (lower-seq) document
    rig.deploy(5, "1.5", key=ed25519.Ed25519PrivateKey.generate())  # forged
    rig.deploy(6, "2")  # a genuine document after them: the device is still listening and still on 2
    assert rig.device.wait_final(6) == "active"
    assert rig.device.updater.applied_seq == 6 > applied
    assert not rig.device.states(0) and not rig.device.states(5)
    assert rig.device.served() == ("2", "2") and "1.5" not in rig.device.store.entry("digits").installed
