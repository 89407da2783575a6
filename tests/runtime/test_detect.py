"""Hardware detection through an injected filesystem view: each hardware class is recognised."""

from __future__ import annotations

import pytest

from edgert.detect import DictFileSystem, HostFileSystem, detect, rank_profiles
from edgert.profiles import available_profiles

CPU_ONLY = ["CPUExecutionProvider"]
X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2\n"
INTEL_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f\n"


@pytest.fixture(scope="module")
def profiles():
    return list(available_profiles().values())


@pytest.mark.parametrize(
    ("files", "providers", "expected"),
    [
        ({"/proc/cpuinfo": X86_CPUINFO}, CPU_ONLY, "cpu-generic"),
        (
            {
                "/etc/nv_tegra_release": "# R36 (release), REVISION: 3.0",
                "/proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit",
            },
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            "jetson-orin",
        ),
        ({"/dev/apex_0": None}, CPU_ONLY, "coral-edgetpu"),
        (
            {"/sys/bus/usb/devices/1-1/idVendor": "18d1\n", "/sys/bus/usb/devices/1-1/idProduct": "9302\n"},
            CPU_ONLY,
            "coral-edgetpu",
        ),
        ({"/proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0"}, CPU_ONLY, "raspberry-pi"),
        (
            {"/proc/cpuinfo": INTEL_CPUINFO},
            ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
            "intel-openvino",
        ),
        ({"/dev/fastrpc-cdsp": None}, ["QNNExecutionProvider", "CPUExecutionProvider"], "qualcomm-qnn"),
        ({"/dev/rknpu": None, "/proc/device-tree/compatible": "rockchip,rk3588"}, CPU_ONLY, "rockchip-rknn"),
    ],
)
def test_each_hardware_class(profiles, files, providers, expected) -> None:
    match = detect(profiles, DictFileSystem(files), providers)
    assert match.profile.name == expected
    assert match.reasons


def test_intel_without_openvino_build_is_generic(profiles) -> None:
    match = detect(profiles, DictFileSystem({"/proc/cpuinfo": INTEL_CPUINFO}), CPU_ONLY)
    assert match.profile.name == "cpu-generic"
    ranked = {
        m.profile.name: m
        for m in rank_profiles(profiles, DictFileSystem({"/proc/cpuinfo": INTEL_CPUINFO}), CPU_ONLY)
    }
    assert not ranked["intel-openvino"].matched
    assert any("lacks OpenVINOExecutionProvider" in r for r in ranked["intel-openvino"].reasons)


def test_qnn_device_without_qnn_build_is_not_qnn(profiles) -> None:
    match = detect(profiles, DictFileSystem({"/dev/fastrpc-cdsp": None}), CPU_ONLY)
    assert match.profile.name == "cpu-generic"


def test_jetson_beats_generic_and_reasons_name_the_evidence(profiles) -> None:
    fs = DictFileSystem({"/etc/nv_tegra_release": "R36"})
    ranked = rank_profiles(profiles, fs, CPU_ONLY)
    assert ranked[0].profile.name == "jetson-orin"
    assert "files: found /etc/nv_tegra_release" in ranked[0].reasons


def test_this_machine_detects_something(profiles) -> None:
    # The CI machine is a plain x86 box: no accelerator profile may claim it.
    match = detect(profiles, HostFileSystem(), CPU_ONLY)
    assert match.profile.name in {"cpu-generic", "raspberry-pi", "rockchip-rknn"}
