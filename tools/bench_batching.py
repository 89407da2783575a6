"""Dynamic batching through the daemon: 32 clients in separate processes, batching on vs off, interleaved.

    python tools/bench_batching.py [--rounds 5] [--seconds 3] [--clients 32] [--models small,large]

One daemon serves each digits model twice under two names that differ only in ``max_batch_size``
(32 with ``max_queue_delay_us = 500``, against 0 = off), both on one intra-op thread. Each round runs
the load generator (tools/loadgen.py: uvloop processes, one request in flight per connection) against
every (transport, model, on/off) cell, the order rotated each round, so drift on this shared machine hits
all cells alike. Transports: the Unix socket (binary frames) and OIP HTTP JSON. Printed per cell: median
req/s over rounds, the per-round on/off ratio (min-max), daemon CPU per request, mean rows per session
run (from the daemon's /metrics), load-generator CPU, and the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from bench_serving import daemon_config, free_port, json_request, spawn_daemon, wait_ready
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
FILES = {"small": "digits_small_int8.onnx", "large": "digits_large_int8.onnx"}
MAX_BATCH = 32
QUEUE_DELAY_US = 500


def start(
    tmp: Path, port: int, mport: int, which: list[str], env_extra: dict[str, str], delay_us: int
) -> subprocess.Popen[bytes]:
    """The daemon with an on and an off entry per model (same file, same threads)."""
    models = ""
    for w in which:
        for mode, batch in (("on", MAX_BATCH), ("off", 0)):
            models += (
                f'[[models]]\nname = "{w}-{mode}"\npath = "{MODELS / FILES[w]}"\nthreads = 1\n'
                f"max_batch_size = {batch}\nmax_queue_delay_us = {delay_us}\n"
            )
    cfg = daemon_config(
        tmp, models, http=f"127.0.0.1:{port}", metrics=f"127.0.0.1:{mport}", socket_path=tmp / "edgert.sock",
        log_level="error",
    )
    return spawn_daemon(cfg, env=env_extra)


def batch_counts(mport: int) -> dict[str, tuple[float, float]]:
    """(sum of rows, session runs) per model from the daemon's Prometheus text."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^edgert_batch_size_(sum|count)\{model="([^"]+)"\} (\S+)$', text, re.M):
        out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def uds_request(model: str, x: np.ndarray) -> bytes:
    """One framed INFER request of the Unix-socket protocol."""
    from edgert.serve import uds_frames as fr

    return b"".join(bytes(b) for b in fr.encode_frame(fr.INFER, {"m": model}, {"pixels": x}))


def main() -> int:
    """Run the interleaved rounds and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--models", default="small,large")
    ap.add_argument("--transports", default="uds,http")
    ap.add_argument("--delay-us", type=int, default=QUEUE_DELAY_US, help="max_queue_delay_us when on")
    ap.add_argument("--json", type=Path, default=None, help="also write a summary to this file")
    args = ap.parse_args()
    which = args.models.split(",")
    x1 = np.load(MODELS / "digits_test.npz")["x"][:1]
    port, mport = free_port(), free_port()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc = start(tmp, port, mport, which, {}, args.delay_us)
        try:
            wait_ready(tmp / "edgert.sock")
            daemon = psutil.Process(proc.pid)
            sock = str(tmp / "edgert.sock")
            cells = [
                (t, w, mode) for t in args.transports.split(",") for w in which for mode in ("on", "off")
            ]
            reqs = {
                c: uds_request(f"{c[1]}-{c[2]}", x1) if c[0] == "uds" else json_request(f"{c[1]}-{c[2]}", x1)
                for c in cells
            }
            for c in cells:  # warm-up: sessions, batcher, connections
                throughput(reqs[c], port, args.clients, 0.5, args.procs, sock if c[0] == "uds" else None)
            res: dict[tuple[str, str, str], list[tuple[float, float, float, float]]] = {c: [] for c in cells}
            loads: list[float] = [os.getloadavg()[0]]
            for r in range(args.rounds):
                k = (2 * r) % len(cells)  # rotate by pairs, so on and off stay adjacent
                for c in cells[k:] + cells[:k]:
                    b0 = batch_counts(mport).get(f"{c[1]}-{c[2]}", (0.0, 0.0))
                    cpu0 = sum(daemon.cpu_times()[:2])
                    rps, lg = throughput(
                        reqs[c], port, args.clients, args.seconds, args.procs, sock if c[0] == "uds" else None
                    )
                    cpu = sum(daemon.cpu_times()[:2]) - cpu0
                    b1 = batch_counts(mport).get(f"{c[1]}-{c[2]}", (0.0, 0.0))
                    nrows, runs = b1[0] - b0[0], b1[1] - b0[1]
                    res[c].append((rps, cpu / max(rps * args.seconds, 1), nrows / runs if runs else 0.0, lg))
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}/{args.rounds} done, load {loads[-1]:.2f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        f"\nbatching on (max_batch_size {MAX_BATCH}, max_queue_delay_us {args.delay_us}) vs off, "
        f"{args.clients} clients in {args.procs} load-generator processes, "
        f"{args.rounds} interleaved rounds x "
        f"{args.seconds:g} s, one intra-op thread, load average {min(loads):.2f}-{max(loads):.2f}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'transport':9} {'model':6} {'mode':4} {'req/s':>8} {'on/off':>7} {'per-round':>12} "
        f"{'daemon CPU/req':>15} {'daemon cores':>12} {'rows/run':>9} {'loadgen cores':>14}"
    )
    summary: dict = {
        "load": [min(loads), max(loads)],
        "clients": args.clients,
        "procs": args.procs,
        "cells": {},
    }
    for c in cells:
        rows = res[c]
        rps = statistics.median(r[0] for r in rows)
        summary["cells"]["/".join(c)] = {
            "req_per_s": rps,
            "daemon_cpu_us_per_req": 1e6 * statistics.median(r[1] for r in rows),
            "rows_per_run": statistics.median(r[2] for r in rows),
        }
        if c[2] == "on":
            off = res[(c[0], c[1], "off")]
            ratios = [a[0] / b[0] for a, b in zip(rows, off, strict=True)]
            summary["cells"]["/".join(c)]["on_off"] = {
                "median": rps / statistics.median(r[0] for r in off),
                "min": min(ratios),
                "max": max(ratios),
            }
            ratio = (
                f"{rps / statistics.median(r[0] for r in off):6.2f}x {min(ratios):5.2f}-{max(ratios):.2f}x"
            )
        else:
            ratio = f"{'':7} {'':12}"
        print(
            f"{c[0]:9} {c[1]:6} {c[2]:4} {rps:8.0f} {ratio} "
            f"{1e6 * statistics.median(r[1] for r in rows):12.0f} µs "
            f"{statistics.median(r[0] * r[1] for r in rows):12.2f} "
            f"{statistics.median(r[2] for r in rows):9.1f} {statistics.median(r[3] for r in rows):14.2f}"
        )
    if args.json:
        from bench_serving import write_json

        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
