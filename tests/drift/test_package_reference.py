"""The reference profile in the signed package: computed, signed, shown, tamper-evident, optional."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from edgert.drift.profile import ReferenceProfile, decode_array, encode_array
from edgert.drift.reference import load_reference_data, profile_model_file
from edgert.errors import ModelError, SignatureError
from edgert.security.keys import DeviceKeys, format_public_key, init_keystore, load_keystore
from edgert.security.package import MAGIC, canonical_json, create_package, read_header
from edgert.security.store import ModelStore
from edgert.security.trust import TrustedPublishers

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
MODEL = MODELS / "digits_small_int8.onnx"
DATA = MODELS / "digits_test.npz"


@pytest.fixture
def device(tmp_path: Path) -> tuple[Path, DeviceKeys]:
    root = tmp_path / "state"
    init_keystore(root / "keys")
    return root, load_keystore(root / "keys")


@pytest.fixture(scope="module")
def profile_doc() -> dict:
    return profile_model_file(MODEL, DATA)


def _package(keys: DeviceKeys, signer: object, reference: dict | None) -> bytes:
    from datetime import datetime, timezone

    from edgert.backends.describe import describe_file
    from edgert.security.package import VariantSource

    fmt, variant, ins, outs = describe_file(MODEL)
    out = io.BytesIO()
    create_package([VariantSource(MODEL, variant, fmt, ins, outs)], out, name="digits", version="1",
                   recipients=[keys.wrap_public], signer=signer,  # type: ignore[arg-type]
                   now=datetime(2026, 1, 1, tzinfo=timezone.utc), reference=reference)
    return out.getvalue()


def _store(root: Path, keys: DeviceKeys, signer: object) -> ModelStore:
    from edgert.security.keys import fingerprint

    public = signer.public_key()  # type: ignore[attr-defined]
    fp = fingerprint(public)
    return ModelStore(root / "models", keys, trusted=TrustedPublishers({fp: public}, {fp: "pinned"}))


@pytest.fixture
def signer() -> object:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate()


def test_profile_is_signed_with_the_manifest_and_reaches_the_device(
        device: tuple[Path, DeviceKeys], signer: object, profile_doc: dict, tmp_path: Path) -> None:
    root, keys = device
    path = tmp_path / "d.edgepkg"
    path.write_bytes(_package(keys, signer, profile_doc))
    store = _store(root, keys, signer)
    store.install(path)
    manifest = store.header("digits").manifest
    assert manifest.reference == profile_doc
    profile = ReferenceProfile.from_dict(manifest.reference)
    assert profile.samples == 360
    assert profile.inputs["pixels"].features == 64
    assert profile.outputs["logits"].to_dict()["kind"] == "classes"


@pytest.mark.parametrize("edit", ["samples", "edges", "class_mix", "removed"])
def test_tampering_with_the_profile_breaks_the_signature(
        device: tuple[Path, DeviceKeys], signer: object, profile_doc: dict, tmp_path: Path,
        edit: str) -> None:
    root, keys = device
    data = _package(keys, signer, profile_doc)
    (n,) = struct.unpack(">I", data[8:12])
    doc, payload = json.loads(data[12:12 + n]), data[12 + n:]
    ref = doc["manifest"]["reference"]
    if edit == "samples":
        ref["samples"] += 1
    elif edit == "edges":  # widen the bins so a drifted stream would look normal
        p = ref["inputs"]["pixels"]
        p["edges"] = encode_array(decode_array(p["edges"], (64, 9)) * 2)
    elif edit == "class_mix":
        ref["outputs"]["logits"]["softmax"] = not ref["outputs"]["logits"]["softmax"]
    else:
        del doc["manifest"]["reference"]
    body = canonical_json(doc)
    path = tmp_path / "t.edgepkg"
    path.write_bytes(MAGIC + struct.pack(">I", len(body)) + body + payload)
    with open(path, "rb") as f:
        header = read_header(f)
    with pytest.raises(SignatureError, match="changed after signing"):
        header.verify_signature()
    with pytest.raises(SignatureError):
        _store(root, keys, signer).install(path)


def test_packages_without_a_profile_still_load(device: tuple[Path, DeviceKeys], signer: object,
                                               tmp_path: Path) -> None:
    root, keys = device
    path = tmp_path / "old.edgepkg"
    path.write_bytes(_package(keys, signer, None))
    store = _store(root, keys, signer)
    manifest = store.install(path)
    assert manifest.reference is None and "reference" not in manifest.raw  # same bytes as before
    spec, model = store.read_model_bytes("digits")
    assert spec.name == "digits" and len(model) == spec.plaintext_size


def test_cli_creates_and_both_inspect_commands_show_the_profile(edgert_cli, tmp_path: Path) -> None:
    pub = tmp_path / "pub.pem"
    assert edgert_cli("package", "keygen", "-o", str(pub)).returncode == 0
    root = tmp_path / "dev"
    keys = init_keystore(root / "keys")
    recipient = format_public_key(keys.wrap_public)
    pkg = tmp_path / "d.edgepkg"
    made = edgert_cli("package", "create", str(MODEL), "--name", "digits", "--version", "2",
                      "--publisher-key", str(pub), "--recipient", recipient, "--reference", str(DATA),
                      "-o", str(pkg))
    assert made.returncode == 0, made.stderr
    assert "reference profile of 360 samples" in made.stdout
    shown = edgert_cli("package", "inspect", str(pkg), "--json")
    assert shown.returncode == 0, shown.stderr
    ref = json.loads(shown.stdout)["reference"]
    assert ref["samples"] == 360 and ref["outputs"]["logits"]["classes"] == 10
    assert ref["inputs"]["pixels"]["features"] == 64
    text = edgert_cli("models", "inspect", str(pkg))
    assert text.returncode == 0, text.stderr
    assert "reference profile: 360 samples" in text.stdout and "10 classes" in text.stdout
    preview = edgert_cli("models", "inspect", str(MODEL), "--reference", str(DATA))
    assert "input pixels: 64 features x 10 bins" in preview.stdout
    plain = edgert_cli("package", "create", str(MODEL), "--name", "digits", "--version", "3",
                       "--publisher-key", str(pub), "--recipient", recipient,
                       "-o", str(tmp_path / "p.edgepkg"))
    assert plain.returncode == 0, plain.stderr
    none = edgert_cli("package", "inspect", str(tmp_path / "p.edgepkg"))
    assert "reference profile: none" in none.stdout


def test_bad_reference_data_is_refused_clearly(edgert_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros((50, 64), np.float32), b=np.zeros((50, 64), np.float32))
    with pytest.raises(ModelError, match=r"no array for model input\(s\) \['pixels'\]") as exc:
        load_reference_data(bad, ["pixels"])
    assert exc.value.hint and "numpy.savez" in exc.value.hint
    notnpz = tmp_path / "x.npz"
    notnpz.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"not a readable \.npz"):
        load_reference_data(notnpz, ["pixels"])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, pixels=np.zeros((50, 63), np.float32))
    pub = tmp_path / "pub.pem"
    edgert_cli("package", "keygen", "-o", str(pub))
    keys = init_keystore(tmp_path / "dev" / "keys")
    res = edgert_cli("package", "create", str(MODEL), "--name", "digits", "--version", "2",
                     "--publisher-key", str(pub), "--recipient", format_public_key(keys.wrap_public),
                     "--reference", str(wrong), "-o", str(tmp_path / "w.edgepkg"))
    assert res.returncode != 0 and "pixels" in res.stderr
    assert not (tmp_path / "w.edgepkg").exists()


def test_fleet_model_add_signs_the_profile_into_the_published_package(edgert_cli, tmp_path: Path) -> None:
    fdir = tmp_path / "f"
    assert edgert_cli("fleet", "init", str(fdir), "--id", "f1").returncode == 0
    added = edgert_cli("fleet", "model", "add", str(MODEL), "--fleet", str(fdir), "--name", "digits",
                       "--version", "4", "--reference", str(DATA), "--json")
    assert added.returncode == 0, added.stderr
    published = sorted(fdir.rglob("*4.edgepkg"))
    assert published
    shown = edgert_cli("package", "inspect", str(published[0]), "--json")
    doc = json.loads(shown.stdout)
    assert doc["signature"]["verifies"] and doc["reference"]["samples"] == 360
    ready = edgert_cli("fleet", "model", "add", "--package", str(published[0]), "--fleet", str(fdir),
                       "--reference", str(DATA))
    assert ready.returncode != 0 and "--reference profiles MODEL files" in ready.stderr
