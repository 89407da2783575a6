"""Issue 8 item 4: the profile's preference picks the variant that loads; the variant comes from the model.

Real packages (signed, several variants), the real store, the real Deployer and runtime.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from edgert.config import ModelEntry
from edgert.device.deployer import Deployer
from edgert.device.sources import ModelSource
from edgert.profiles import variant_order
from edgert.runtime import Runtime
from edgert.security.keys import DeviceKeys
from edgert.security.loader import open_keystore
from edgert.security.package import VariantSource
from tests.device.subproc import cli
from tests.security.kit import MODELS, fleet_store, make_package, source

pytest.importorskip("ai_edge_litert")


def test_variant_order_is_the_profiles_then_the_rest() -> None:
    order = variant_order(("edgetpu", "int8", "fp32"), ["fp32", "int8-tflite", "int8", "edgetpu", "fp16"])
    assert [v for v, _ in order] == ["edgetpu", "int8-tflite", "int8", "fp32", "fp16"]
    assert order[0][1].startswith("first") and "not in the profile" in order[-1][1]


def _deploy(tmp_path: Path, sources: list[VariantSource], profile: str) -> tuple[str, str]:
    keys: DeviceKeys = open_keystore(tmp_path / "state", create=True)
    store = fleet_store(tmp_path / "models", keys)
    pkg = tmp_path / "digits-1.edgepkg"
    pkg.write_bytes(make_package(sources, [keys]))
    store.install(pkg, activate=False)
    runtime = Runtime(profile=profile)
    deployer = Deployer(source=ModelSource(runtime, lambda: store), target=None, audit=lambda *a, **k: None,
                        models=lambda: (ModelEntry("digits"),), preferred_variants=runtime.profile.variants)
    done = asyncio.run(deployer.deploy("digits", "1", origin="test"))
    assert store.entry("digits").active == "1"
    return done.variant, done.variant_reason


def test_cpu_profile_prefers_int8_over_fp32(tmp_path: Path) -> None:
    sources = [source(MODELS / "digits_small_fp32.onnx", "fp32"), source(MODELS / "digits_small_int8.onnx")]
    variant, why = _deploy(tmp_path, sources, "cpu-generic")
    assert variant == "int8" and why == "first in the profile's preference order"


def test_a_variant_that_does_not_load_falls_back_to_the_next(tmp_path: Path) -> None:
    """An Edge TPU build (its custom op needs the Coral delegate) cannot load here: int8 serves instead."""
    from tests.runtime.synthetic import tflite_edgetpu

    edgetpu = tmp_path / "m_edgetpu.tflite"
    edgetpu.write_bytes(tflite_edgetpu())
    sources = [source(edgetpu, "edgetpu"), source(MODELS / "digits_small_int8.tflite")]
    variant, why = _deploy(tmp_path, sources, "coral-edgetpu")
    assert variant == "int8"
    assert why.startswith("next in the profile's preference order; before it, edgetpu:"), why


def test_import_detects_the_variant_from_the_model_not_its_name(tmp_path: Path) -> None:
    """An int8 model imported as digits.onnx used to be recorded as fp32 (the name has no 'int8')."""
    renamed = tmp_path / "digits.onnx"
    shutil.copy(MODELS / "digits_small_int8.onnx", renamed)
    fp32_named_int8 = tmp_path / "digits_int8.onnx"
    shutil.copy(MODELS / "digits_small_fp32.onnx", fp32_named_int8)
    st = str(tmp_path / "state")
    assert cli("keys", "init", "--state-dir", st).returncode == 0
    for version, path in (("1", renamed), ("2", fp32_named_int8)):
        r = cli("models", "import", str(path), "--name", "digits", "--version", version, "--state-dir", st,
                "--socket", str(tmp_path / "none.sock"))
        assert r.returncode == 0, r.stderr
    r = cli("models", "list", "--json", "--state-dir", st, "--socket", str(tmp_path / "none.sock"))
    (entry,) = json.loads(r.stdout)
    assert entry["variants"] == {"1": ["int8"], "2": ["fp32"]}
    assert entry["serving"]["variant"] == "fp32" and entry["serving"]["source"] == "would serve"
