"""The fleet repository against a real python-tuf ``ngclient.Updater`` over a real HTTP server.

The repository directory is served as is by Python's ``http.server`` on 127.0.0.1 (the route a CDN
or bucket takes); the device side is a real store that trusts the fleet publisher.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater

from edgert.errors import KeyFileError
from edgert.fleet.fleetdir import FleetDir, add_device
from edgert.fleet.keyrecords import wrapped_key_record
from edgert.fleet.repo_init import init_fleet
from edgert.fleet.repo_models import add_model, list_models
from edgert.fleet.repository import TufRepository
from edgert.security.keys import format_public_key
from edgert.security.loader import open_keystore, open_store
from edgert.security.package import PackageHeader, read_header

REPO = Path(__file__).resolve().parents[2]
ONNX = REPO / "models" / "digits_small_int8.onnx"
TFLITE = REPO / "models" / "digits_small_int8.tflite"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A real HTTP server over ``directory`` on 127.0.0.1 (ephemeral port), in a thread; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def make_updater(fleet: FleetDir, url: str, client_dir: Path, bootstrap: bytes) -> Updater:
    """A device-side TUF client with its own metadata and download directories."""
    (client_dir / "metadata").mkdir(parents=True, exist_ok=True)
    (client_dir / "targets").mkdir(parents=True, exist_ok=True)
    return Updater(str(client_dir / "metadata"), f"{url}/metadata/", str(client_dir / "targets"),
                   f"{url}/targets/", bootstrap=bootstrap)


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    """A fresh fleet with one registered device in group 'lab'."""
    return init_fleet(tmp_path / "fleet", fleet_id="f1").fleet


def device_keys(root: Path):  # type: ignore[no-untyped-def]
    """A real device keystore under ``root``."""
    return open_keystore(root, create=True)


def test_model_add_two_variants_downloads_and_installs_on_a_device(fleet: FleetDir, tmp_path: Path) -> None:
    dev_root = tmp_path / "dev1"
    keys = device_keys(dev_root)
    add_device(fleet, "dev1", groups=["lab"], x25519=format_public_key(keys.wrap_public))
    np.savez(tmp_path / "in.npz", pixels=np.zeros((1, 64), np.float32))
    np.savez(tmp_path / "out.npz", logits=np.zeros((1, 10), np.float32))
    target = add_model(fleet, [ONNX, TFLITE], name="digits", version="2", groups=["lab"],
                       golden=(tmp_path / "in.npz", tmp_path / "out.npz"))
    assert target.target == "models/digits/2.edgepkg"
    custom = target.custom["edgert"]
    assert [v["variant"] for v in custom["variants"]] == ["int8", "int8-tflite"]
    assert [v["format"] for v in custom["variants"]] == ["onnx", "tflite"]
    assert custom["golden"]["inputs"] and custom["size"] == target.length
    assert (fleet.targets_dir / f"models/digits/{target.sha256}.2.edgepkg").is_file()
    assert [m.target for m in list_models(fleet)] == ["models/digits/2.edgepkg"]
    with serve_directory(fleet.repository_dir) as url:
        updater = make_updater(fleet, url, tmp_path / "client", fleet.root_bytes(1))
        updater.refresh()
        info = updater.get_targetinfo("models/digits/2.edgepkg")
        assert info is not None and info.custom == target.custom
        path = Path(updater.download_target(info))
    store = open_store(dev_root, keys, extra_publishers=[fleet.publisher_public])
    manifest = store.install(path)
    assert (manifest.name, manifest.version) == ("digits", "2")
    assert manifest.variant_names == ["int8", "int8-tflite"]
    _vm, plain = store.read_model_bytes("digits", "2", variant="int8-tflite")
    assert bytes(plain) == TFLITE.read_bytes()


def test_a_tampered_target_is_refused(fleet: FleetDir, tmp_path: Path) -> None:
    target = add_model(fleet, [ONNX], name="digits", version="1")
    stored = fleet.targets_dir / f"models/digits/{target.sha256}.1.edgepkg"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    with serve_directory(fleet.repository_dir) as url:
        updater = make_updater(fleet, url, tmp_path / "client", fleet.root_bytes(1))
        updater.refresh()
        info = updater.get_targetinfo(target.target)
        assert info is not None
        with pytest.raises(tuf_exc.LengthOrHashMismatchError):
            updater.download_target(info)


def test_an_expired_timestamp_is_refused(fleet: FleetDir, tmp_path: Path) -> None:
    with serve_directory(fleet.repository_dir) as url:
        make_updater(fleet, url, tmp_path / "ok", fleet.root_bytes(1)).refresh()  # fresh: accepted
        # python-tuf reads the clock itself, so the repository signs with a clock two days back:
        # a one-day timestamp made then expired yesterday.
        TufRepository(fleet).refresh_timestamp(datetime.now(timezone.utc) - timedelta(days=2))
        stale = Metadata.from_file(str(fleet.metadata_dir / "timestamp.json"))
        assert isinstance(stale.signed, Timestamp) and stale.signed.expires < datetime.now(timezone.utc)
        with pytest.raises(tuf_exc.ExpiredMetadataError):
            make_updater(fleet, url, tmp_path / "late", fleet.root_bytes(1)).refresh()


@pytest.mark.parametrize("role", ["timestamp", "targets", "snapshot", "root"])
def test_clients_follow_a_key_rotation_and_refuse_the_rotated_out_key(fleet: FleetDir, tmp_path: Path,
                                                                     role: str) -> None:
    repo = TufRepository(fleet)
    add_model(fleet, [ONNX], name="digits", version="1")
    old_signer = repo.signers(role)[0]
    with serve_directory(fleet.repository_dir) as url:
        updater = make_updater(fleet, url, tmp_path / "client", fleet.root_bytes(1))
        updater.refresh()  # trusts root 1 and the old keys
        rotation = repo.rotate(role)
        assert rotation.root_version == 2 and rotation.old_keyids != rotation.new_keyids
        assert rotation.retired == rotation.old_keyids  # the old key files are gone
        add_model(fleet, [ONNX], name="digits", version="2")
        updater = make_updater(fleet, url, tmp_path / "client", fleet.root_bytes(1))
        updater.refresh()  # the same client state walks root 1 -> 2 and keeps updating
        assert updater.get_targetinfo("models/digits/2.edgepkg") is not None
        trusted_root = Metadata.from_file(str(tmp_path / "client/metadata/root.json"))
        assert trusted_root.signed.version == 2
        if role == "root":
            return
        # An attacker holding the rotated-out key signs a newer version of that role: refused.
        forged = repo.load(role)
        forged.signed.version += 10
        forged.signatures.clear()
        forged.sign(old_signer)
        name = "timestamp.json" if role == "timestamp" else f"{forged.signed.version}.{role}.json"
        if role != "timestamp":  # make the chain point at the forged version
            _point_at(repo, role, forged.signed.version)
        (fleet.metadata_dir / name).write_bytes(forged.to_bytes(JSONSerializer()))
        updater = make_updater(fleet, url, tmp_path / "client", fleet.root_bytes(1))
        with pytest.raises(tuf_exc.UnsignedMetadataError):
            updater.refresh()


def _point_at(repo: TufRepository, role: str, version: int) -> None:
    """Re-sign (with the real keys) the metadata that names ``role``'s version, so only ``role`` is forged."""
    from tuf.api.metadata import MetaFile

    if role == "targets":
        snap = repo.load("snapshot")
        snap.signed.meta["targets.json"] = MetaFile(version=version)
        snap.signed.version += 1
        TufRepository._sign(snap, repo.signers("snapshot"))
        repo._write("snapshot", snap)
        repo.refresh_timestamp()
    elif role == "snapshot":
        ts = repo.load("timestamp")
        ts.signed.snapshot_meta = MetaFile(version=version)
        ts.signed.version += 1
        TufRepository._sign(ts, repo.signers("timestamp"))
        repo._write("timestamp", ts)


def test_a_keyrecord_lets_a_device_enrolled_after_model_add_install(fleet: FleetDir, tmp_path: Path) -> None:
    target = add_model(fleet, [ONNX, TFLITE], name="digits", version="3", groups=["lab"])
    late_root = tmp_path / "late"
    keys = device_keys(late_root)
    add_device(fleet, "late", groups=["lab"], x25519=format_public_key(keys.wrap_public))
    package = TufRepository(fleet).target_file(target.target).read_bytes()
    header = read_header(io.BytesIO(package))
    with pytest.raises(KeyFileError):
        header.key_for(keys.wrap)  # not wrapped for it at model add
    record = wrapped_key_record(fleet, "late", target.target)
    assert record["device"] == "late" and record["manifest_sha256"] == header.manifest.digest
    assert "wrapped" in record["record"] and str(keys.wrap) not in str(record)
    # The device appends the record to the recipients (outside the publisher's signature) and installs.
    spliced = PackageHeader(header.manifest, [*header.recipients, record["record"]], 0, header.signature)
    pkg = tmp_path / "spliced.edgepkg"
    pkg.write_bytes(spliced.to_bytes() + package[header.payload_offset:])
    store = open_store(late_root, keys, extra_publishers=[fleet.publisher_public])
    assert store.install(pkg).version == "3"
    _vm, plain = store.read_model_bytes("digits", "3", variant="int8")
    assert bytes(plain) == ONNX.read_bytes()


def test_a_keyrecord_is_useless_for_another_package(fleet: FleetDir, tmp_path: Path) -> None:
    from edgert.errors import IntegrityError

    first = add_model(fleet, [ONNX], name="digits", version="1")
    second = add_model(fleet, [ONNX], name="digits", version="2")
    keys = device_keys(tmp_path / "late")
    add_device(fleet, "late", groups=["lab"], x25519=format_public_key(keys.wrap_public))
    record = wrapped_key_record(fleet, "late", first.target)
    other = read_header(io.BytesIO(TufRepository(fleet).target_file(second.target).read_bytes()))
    spliced = PackageHeader(other.manifest, [*other.recipients, record["record"]], 0, other.signature)
    with pytest.raises(IntegrityError):
        spliced.key_for(keys.wrap)
