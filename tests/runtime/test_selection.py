"""Provider and delegate selection follows the profile, skips what is missing, reports the truth.

Accelerator paths (TensorRT, CUDA, OpenVINO, QNN, Edge TPU) cannot run on this CPU-only
machine, so availability is injected: the pure planner is tested directly, the fallback loop with
a session factory that fails the way a missing accelerator does, and the real onnxruntime path with
providers that the CPU-only build lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert import Runtime
from edgert.backends.litert import create_interpreter
from edgert.backends.onnx import create_session, plan_providers
from edgert.profiles import load_profile

JETSON = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _names(attempt):
    return [(p.name, p.label) for p in attempt.providers]


def test_plan_jetson_full() -> None:
    attempts, skipped = plan_providers(load_profile("jetson-orin").providers, JETSON)
    assert [a.primary.name for a in attempts] == JETSON
    assert [p.name for p in attempts[0].providers] == JETSON
    assert [p.name for p in attempts[1].providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert skipped == []


def test_plan_jetson_without_tensorrt() -> None:
    attempts, skipped = plan_providers(load_profile("jetson-orin").providers, JETSON[1:])
    assert [a.primary.name for a in attempts] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert skipped == [("TensorrtExecutionProvider", "not available in this onnxruntime build")]


def test_plan_openvino_device_types_in_order() -> None:
    attempts, _ = plan_providers(
        load_profile("intel-openvino").providers, ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    )
    assert [_names(a) for a in attempts] == [
        [("OpenVINOExecutionProvider", "NPU"), ("CPUExecutionProvider", "")],
        [("OpenVINOExecutionProvider", "GPU"), ("CPUExecutionProvider", "")],
        [("OpenVINOExecutionProvider", "CPU"), ("CPUExecutionProvider", "")],
        [("CPUExecutionProvider", "")],
    ]
    assert attempts[0].primary.options["device_type"] == "NPU"


def test_plan_qnn_missing_falls_to_cpu() -> None:
    attempts, skipped = plan_providers(load_profile("qualcomm-qnn").providers, ["CPUExecutionProvider"])
    assert [a.primary.name for a in attempts] == ["CPUExecutionProvider"]
    assert skipped[0][0] == "QNNExecutionProvider[HTP]"


class _FakeSession:
    """Stands in for an onnxruntime session in pure selection tests only."""

    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self):
        return []

    def get_outputs(self):
        return []


def test_fallback_loop_openvino_npu_missing_gpu_works() -> None:
    calls: list[tuple[str, dict]] = []

    def factory(model, options, providers, provider_options):
        calls.append((providers[0], provider_options[0]))
        if provider_options[0].get("device_type") == "NPU":
            raise RuntimeError("[OpenVINO-EP] No NPU device found\nmore detail")
        return _FakeSession(providers)

    s = create_session(
        b"model",
        load_profile("intel-openvino").providers,
        available=["OpenVINOExecutionProvider", "CPUExecutionProvider"],
        factory=factory,
    )
    assert s.selection.effective == "OpenVINOExecutionProvider[GPU]"
    assert [c[1].get("device_type") for c in calls] == ["NPU", "GPU"]
    assert (
        "OpenVINOExecutionProvider[NPU]",
        "failed to initialise: [OpenVINO-EP] No NPU device found",
    ) in s.selection.skipped


def test_fallback_loop_jetson_everything_fails_but_cpu() -> None:
    def factory(model, options, providers, provider_options):
        if providers[0] != "CPUExecutionProvider":
            raise RuntimeError(f"{providers[0]}: libcudart.so.12: cannot open shared object file")
        return _FakeSession(providers)

    s = create_session(b"m", load_profile("jetson-orin").providers, available=JETSON, factory=factory)
    assert s.selection.effective == "CPUExecutionProvider"
    assert s.selection.fell_back
    assert [p for p, _ in s.selection.skipped] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def test_real_onnxruntime_jetson_profile_reports_cpu(models_dir: Path) -> None:
    # Claim TensorRT and CUDA exist; the real CPU-only onnxruntime falls back and we must say so.
    rt = Runtime("jetson-orin", available_providers=JETSON)
    model = rt.load(models_dir / "digits_small_int8.onnx")
    assert model.provider == "CPUExecutionProvider"
    assert model.selection.fell_back
    skipped = dict(model.selection.skipped)
    assert skipped["TensorrtExecutionProvider"] == "onnxruntime fell back to CPUExecutionProvider"
    out = model.infer({"pixels": np.zeros((2, 64), np.float32)})
    assert out["logits"].shape == (2, 10)


def test_real_onnxruntime_qnn_profile_on_cpu(models_dir: Path) -> None:
    model = Runtime("qualcomm-qnn").load(models_dir / "digits_small_int8.onnx")
    assert model.provider == "CPUExecutionProvider"
    assert model.selection.skipped[0] == (
        "QNNExecutionProvider[HTP]",
        "not available in this onnxruntime build",
    )


def test_coral_delegate_missing_falls_back_to_litert_cpu(models_dir: Path) -> None:
    # Real LiteRT: libedgetpu.so.1 is not installed here, so the delegate load really fails.
    model = Runtime("coral-edgetpu").load(models_dir / "digits_small_int8.tflite")
    assert model.provider == "litert:cpu"
    assert model.selection.fell_back
    assert model.selection.skipped[0][0] == "edgetpu"
    assert "libedgetpu.so.1" in model.selection.skipped[0][1]


def test_coral_delegate_present_is_used_in_order() -> None:
    loaded: list[str] = []
    made: list[list] = []

    class _Interp:
        def allocate_tensors(self):
            pass

        def get_signature_list(self):
            return {}

        def get_input_details(self):
            return [
                {
                    "name": "x",
                    "index": 0,
                    "dtype": np.float32,
                    "shape": np.array([1, 4]),
                    "shape_signature": np.array([-1, 4]),
                    "quantization_parameters": {},
                }
            ]

        def get_output_details(self):
            return [
                {
                    "name": "y",
                    "index": 1,
                    "dtype": np.float32,
                    "shape": np.array([1, 2]),
                    "shape_signature": np.array([-1, 2]),
                    "quantization_parameters": {},
                }
            ]

    def loader(library, options):
        loaded.append(library)
        return f"delegate:{library}"

    def factory(content, delegates, threads):
        made.append(delegates)
        return _Interp()

    s = create_interpreter(b"x", load_profile("coral-edgetpu").delegates, loader=loader, factory=factory)
    assert s.selection.effective == "litert:edgetpu"
    assert loaded == ["libedgetpu.so.1"]
    assert made == [["delegate:libedgetpu.so.1"]]
    assert not s.selection.fell_back


@pytest.mark.parametrize("profile", ["cpu-generic", "raspberry-pi", "intel-openvino", "rockchip-rknn"])
def test_every_profile_runs_on_this_cpu(models_dir: Path, profile: str) -> None:
    model = Runtime(profile).load(models_dir / "digits_small_int8.onnx")
    assert model.provider == "CPUExecutionProvider"
    assert model.infer({"pixels": np.ones((1, 64), np.float32)})["logits"].shape == (1, 10)
