"""onnxruntime intra-op spinning on and off, side by side in one interleaved run (issue 10).

Two daemons from this tree, identical but for the cpu-generic profile's
``session.intra_op.allow_spinning`` entry, serve MobileNetV2 int8 (OIP JSON, 1.6 MB request) and
digits-small int8; one client calls bare onnxruntime, then each daemon, round by round, so both see
the same load from whatever else runs on the machine. Rows: p50 and its ratio to bare, and server
CPU per request (the spinning threads burn CPU after each run even when the client is idle).

    python tools/bench_spin.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from bench_json_tensors import MODEL, REPO, Daemon, json_request

DIGITS = REPO / "models" / "digits_small_int8.onnx"
PROFILE = (REPO / "device_profiles" / "cpu-generic.toml").read_text()


#: The daemons compared: their cpu-generic profile's onnxruntime session config entries.
VARIANTS: dict[str, dict[str, str]] = {
    "spin_on": {"session.intra_op.allow_spinning": "1"},
    "spin_off": {"session.intra_op.allow_spinning": "0"},
    # Spin while a Run is active, stop the moment it returns (onnxruntime's force_spinning_stop).
    "spin_during_run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
}


def profile_text(config: dict[str, str]) -> str:
    """cpu-generic with exactly these session config entries on its CPU provider."""
    head, sep, tail = PROFILE.partition('name = "CPUExecutionProvider"')
    entry = "\nsession_config = { " + ", ".join(f'"{k}" = "{v}"' for k, v in config.items()) + " }"
    tail = "\n".join(line for line in tail.splitlines() if "session_config" not in line)
    return head + sep + entry + tail


class SpinDaemon(Daemon):
    """A daemon serving MobileNetV2 and digits-small with spinning on or off."""

    def __init__(self, tmp: Path, name: str) -> None:
        prof = tmp.parent / f"cpu-{name}.toml"
        prof.write_text(profile_text(VARIANTS[name]).replace('name = "cpu-generic"', f'name = "cpu-{name}"'))
        models = f'[[models]]\nname = "mobilenet"\npath = "{MODEL}"\n'
        models += f'[[models]]\nname = "digits"\npath = "{DIGITS}"\n'
        super().__init__(REPO, tmp, models, profile=str(prof))


def digits_request() -> bytes:
    """One digits row over OIP JSON."""
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}
    body = orjson.dumps({"inputs": [tensor]})
    return (
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


def run(rounds: int, variants: list[str]) -> dict:
    """Interleaved rounds: bare, then each variant's daemon, for each model."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as edgert imports it
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reqs = {"mobilenet": json_request(x), "digits": digits_request()}
    bare = {
        "mobilenet": (ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]), {"input": x}),
        "digits": (
            ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]),
            {"pixels": np.ones((1, 64), np.float32)},
        ),
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        daemons = {name: SpinDaemon(tmp / name, name) for name in variants}
        try:
            for d in daemons.values():
                for req in reqs.values():
                    for _ in range(3):
                        d.call(req)
            lat = {(m, k): [] for m in reqs for k in ("bare", *daemons)}
            cpu = dict.fromkeys(lat, 0.0)
            for m, req in reqs.items():  # one phase per model; the daemons' CPU is read per phase
                sess, feed = bare[m]
                start = {name: d.cpu() for name, d in daemons.items()}
                for _ in range(rounds):
                    t, c = time.perf_counter(), time.process_time()
                    sess.run(None, feed)
                    lat[(m, "bare")].append(time.perf_counter() - t)
                    cpu[(m, "bare")] += time.process_time() - c
                    for name, d in daemons.items():
                        t = time.perf_counter()
                        d.call(req)
                        lat[(m, name)].append(time.perf_counter() - t)
                        # let a spinning pool finish before the other daemon's request, so one
                        # daemon's spin does not slow the other's; the spin still counts as its CPU
                        time.sleep(0.002)
                for name, d in daemons.items():
                    cpu[(m, name)] = d.cpu() - start[name]
        finally:
            for d in daemons.values():
                d.stop()
    out: dict = {"rounds": rounds}
    for m in reqs:
        b = float(np.median(lat[(m, "bare")]))
        out[m] = {
            k: {
                "p50_ms": round(float(np.median(lat[(m, k)])) * 1e3, 3),
                "p50_ratio_to_bare": round(float(np.median(lat[(m, k)])) / b, 2),
                "cpu_ms_per_req": round(cpu[(m, k)] / rounds * 1e3, 2),
            }
            for k in ("bare", *daemons)
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--variants", default="spin_on,spin_off", help=f"of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    print(json.dumps(run(args.rounds, args.variants.split(",")), indent=2))


if __name__ == "__main__":
    main()
