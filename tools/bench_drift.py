"""Drift overhead on digits throughput: drift on against drift off, interleaved, side by side in one run.

Three views of the same cost (target: <= 3%, DESIGN section 5). Each reports requests/s (wall
clock) and CPU microseconds per request (the daemon's own CPU from /proc, or this process's for the
in-process row), on and off; the CPU figure is what a dedicated device pays and is robust to other
load on a shared machine. Rounds alternate ABBA.

* **daemon, OIP HTTP JSON, 32 clients**: one daemon serves the same signed digits package (with its
  reference profile) under three names: ``digits-on`` (drift on with the defaults: about one
  request in 4 observed), ``digits-every`` (``sample_every = 1``) and ``digits-off``
  (``enabled = false``); uvloop load generators in separate processes alternate between them.
* **daemon, Unix socket, one client**: the same three names, sequential requests.
* **in process**: ``Engine.infer_sync`` alone against ``Engine.infer_sync`` plus
  ``DriftMonitor.observe`` (no transport: the worst case, the smallest denominator).

    python tools/bench_drift.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from bench_serving import free_port, json_request, wait_ready
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
MODEL = MODELS / "digits_small_int8.onnx"
#: drift on with the defaults (sample_every = 4), on for every request, and off
NAMES = ("digits-on", "digits-every", "digits-off")
SAMPLE_EVERY = {"digits-on": 4, "digits-every": 1}


def install(state: Path) -> None:
    """The digits package with its reference profile, installed under both names."""
    from edgert.backends.describe import describe_file
    from edgert.drift.reference import profile_model_file
    from edgert.security.loader import open_keystore, open_store
    from edgert.security.package import VariantSource, create_package

    reference = profile_model_file(MODEL, MODELS / "digits_test.npz")
    store = open_store(state, open_keystore(state, create=True))
    fmt, variant, ins, outs = describe_file(MODEL)
    for name in NAMES:
        pkg = state.parent / f"{name}.edgepkg"
        with open(pkg, "w+b") as out:
            create_package([VariantSource(MODEL, variant, fmt, ins, outs)], out, name=name, version="1",
                           recipients=[store.keys.wrap_public], signer=store.keys.sign,
                           now=datetime.now(timezone.utc), reference=reference)
        store.install(pkg)


def start(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "edgert.toml"
    cfg.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{tmp / "state"}"
log_level = "warning"
[http]
listen = "127.0.0.1:{port}"
[metrics]
listen = ""
[socket]
path = "{tmp / "edgert.sock"}"
[[models]]
name = "digits-on"
[[models]]
name = "digits-every"
[models.drift]
sample_every = 1
[[models]]
name = "digits-off"
[models.drift]
enabled = false
""")
    proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    wait_ready(tmp / "edgert.sock")
    return proc


def daemon_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), for per-request cost of the daemon."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(rounds: dict[str, list[tuple[float, float, int]]]) -> dict[str, Any]:
    """Per side: requests/s (wall) and CPU us/request; the cost of drift as ratios against off.

    ``rounds[name]`` holds (wall seconds, CPU seconds, requests) per round. The ratios compare sums
    over all rounds, which were interleaved (forward, then reverse order), so slow drifts in machine
    load cancel out.
    """
    out: dict[str, float] = {}
    for name in rounds:
        wall = sum(r[0] for r in rounds[name])
        cpu = sum(r[1] for r in rounds[name])
        n = sum(r[2] for r in rounds[name])
        out[f"{name}_req_per_s"] = round(n / wall, 1)
        out[f"{name}_cpu_us_per_req"] = round(cpu / n * 1e6, 2)
    off_rps, off_cpu = out["digits-off_req_per_s"], out["digits-off_cpu_us_per_req"]
    off = rounds["digits-off"]
    for name in rounds:
        if name != "digits-off":
            out[f"{name}_throughput_ratio"] = round(out[f"{name}_req_per_s"] / off_rps, 4)
            out[f"{name}_cpu_ratio"] = round(out[f"{name}_cpu_us_per_req"] / off_cpu, 4)
            # spread of the per-round CPU ratios (round i against the off round next to it): the noise
            per_round = [(a[1] / a[2]) / (b[1] / b[2]) for a, b in zip(rounds[name], off, strict=True)]
            q1, q3 = np.percentile(per_round, [25, 75])
            out[f"{name}_cpu_ratio_iqr"] = f"{q1:.3f}..{q3:.3f}"
    return out


def order(r: int) -> tuple[str, ...]:
    """Forward, then reverse (A B C C B A ...)."""
    return NAMES if r % 2 == 0 else NAMES[::-1]


def bench_http(port: int, pid: int, rounds: int, secs: float) -> dict[str, Any]:
    x1 = np.load(MODELS / "digits_test.npz")["x"][:1]
    out: dict[str, list[tuple[float, float, int]]] = {n: [] for n in NAMES}
    gen_cpu: list[float] = []
    for r in range(rounds):
        for name in order(r):
            c0 = daemon_cpu_s(pid)
            rps, gen = throughput(json_request(name, x1), port, 32, secs)
            out[name].append((secs, daemon_cpu_s(pid) - c0, max(1, round(rps * secs))))
            gen_cpu.append(gen)
    return {**summarize(out), "loadgen_cpu_cores": round(float(np.median(gen_cpu)), 2)}


def bench_socket(sock: Path, pid: int, rounds: int, n: int) -> dict[str, Any]:
    from edgert.client import Client

    x = np.load(MODELS / "digits_test.npz")["x"].astype(np.float32)
    rows = [x[i:i + 1] for i in range(len(x))]
    out: dict[str, list[tuple[float, float, int]]] = {name: [] for name in NAMES}
    with Client(f"unix://{sock}") as c:
        for name in NAMES:
            for i in range(200):
                c.infer(name, {"pixels": rows[i % len(rows)]})
        for r in range(rounds):
            for name in order(r):
                t, c0 = time.perf_counter(), daemon_cpu_s(pid)
                for i in range(n):
                    c.infer(name, {"pixels": rows[i % len(rows)]})
                out[name].append((time.perf_counter() - t, daemon_cpu_s(pid) - c0, n))
    return summarize(out)


def bench_in_process(rounds: int, n: int) -> dict[str, Any]:
    from edgert.drift import DriftMonitor, DriftSettings, ReferenceProfile
    from edgert.drift.reference import profile_model_file
    from edgert.engine import Engine
    from edgert.engine.config import ModelConfig
    from edgert.metrics import Metrics
    from edgert.runtime import Runtime

    engine = Engine(Metrics())
    engine.add_model(Runtime("cpu-generic").load(MODEL, name="digits"), ModelConfig(name="digits"))
    profile = ReferenceProfile.from_dict(profile_model_file(MODEL, MODELS / "digits_test.npz"))
    monitors = {name: DriftMonitor("digits", "1", profile, DriftSettings(sample_every=every))
                for name, every in SAMPLE_EVERY.items()}
    x = np.load(MODELS / "digits_test.npz")["x"].astype(np.float32)
    # as the socket front end hands them over: read-only views of an immutable request body
    rows = [np.frombuffer(x[i:i + 1].tobytes(), np.float32).reshape(1, 64) for i in range(len(x))]
    out: dict[str, list[tuple[float, float, int]]] = {name: [] for name in NAMES}

    def run(name: str) -> tuple[float, float, int]:
        monitor = monitors.get(name)
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            inputs = {"pixels": rows[i % len(rows)]}
            result = engine.infer_sync("digits", inputs)
            if monitor is not None:
                monitor.observe(inputs, result.outputs)
        return time.perf_counter() - t, time.process_time() - c, n

    for name in NAMES:
        run(name)
    for r in range(rounds):
        for name in order(r):
            out[name].append(run(name))
    engine.close()
    return summarize(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--rounds", type=int, default=0, help="daemon rounds per name (default 8; 4 quick)")
    args = ap.parse_args()
    rounds = args.rounds or (4 if args.quick else 8)
    blocks = 10 if args.quick else 40  # short interleaved blocks for the in-process rows
    report: dict[str, object] = {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    report["in_process"] = bench_in_process(blocks, 1000)
    print(json.dumps({"in_process": report["in_process"]}), flush=True)
    with tempfile.TemporaryDirectory(prefix="edgert-bench-drift-") as d:
        tmp = Path(d)
        (tmp / "state").mkdir()
        install(tmp / "state")
        port = free_port()
        proc = start(tmp, port)
        try:
            n = 2000 if args.quick else 5000
            report["socket_1_client"] = bench_socket(tmp / "edgert.sock", proc.pid, rounds, n)
            print(json.dumps({"socket_1_client": report["socket_1_client"]}), flush=True)
            report["http_json_32_clients"] = bench_http(port, proc.pid, rounds, 2.0 if args.quick else 4.0)
            print(json.dumps({"http_json_32_clients": report["http_json_32_clients"]}), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
