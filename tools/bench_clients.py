"""Throughput at 16 vs 32 HTTP clients, with and without the server's post-response linger, interleaved.

    python tools/bench_clients.py [--rounds 6] [--seconds 3] [--linger 0,250] [--clients 16,32] [--procs 2]

One daemon per linger budget (``EDGERT_LINGER_US``), each serving digits-small int8 on one intra-op
thread, all up at once. Each round runs the load generator (tools/loadgen.py) against every
(linger, clients, load-generator processes) cell in a rotated order. Printed per cell: median and
min-max req/s over rounds, the per-round 32/16 ratio, daemon CPU per request, load-generator CPU and
the load average, so a swing can be pinned on the server (its CPU per request moves) or on the load
generator (its CPU or process count moves the result).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
from bench_serving import daemon_config, free_port, json_request, spawn_daemon, wait_ready
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


def start(
    tmp: Path, port: int, linger_us: int, tree: Path | None = None
) -> tuple[psutil.Process, subprocess.Popen[bytes]]:
    """A daemon serving digits (threads = 1) with the given linger budget, from ``tree`` if given."""
    tmp.mkdir()
    models = f'[[models]]\nname = "digits"\npath = "{MODELS / "digits_small_int8.onnx"}"\nthreads = 1\n'
    sock = tmp / "edgert.sock"
    cfg = daemon_config(tmp, models, http=f"127.0.0.1:{port}", socket_path=sock, log_level="error")
    proc = spawn_daemon(cfg, tree, {"EDGERT_LINGER_US": str(linger_us)})
    try:
        wait_ready(tmp / "edgert.sock")
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    return psutil.Process(proc.pid), proc


def main() -> int:
    """Run interleaved rounds and print one row per cell."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--linger", default="0,250")
    ap.add_argument("--clients", default="16,32")
    ap.add_argument("--procs", default="2")
    ap.add_argument(
        "--baseline", type=Path, default=None, help="also run daemons from this checkout (e.g. /work/main)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write a summary to this file")
    args = ap.parse_args()
    specs = [(v, int(v), None) for v in args.linger.split(",")]
    if args.baseline:
        specs += [(f"{v}@base", int(v), args.baseline.resolve()) for v in args.linger.split(",")]
    lingers = [s[0] for s in specs]
    clients = [int(v) for v in args.clients.split(",")]
    procs = [int(v) for v in args.procs.split(",")]
    req = json_request("digits", np.load(MODELS / "digits_test.npz")["x"][:1])
    with tempfile.TemporaryDirectory() as d:
        daemons: dict[str, tuple[int, psutil.Process, subprocess.Popen[bytes]]] = {}
        try:
            for i, (label, us, tree) in enumerate(specs):
                port = free_port()
                daemons[label] = (port, *start(Path(d) / f"d{i}", port, us, tree))
            cells = list(itertools.product(lingers, procs, clients))
            for lg, p, c in cells:  # warm-up
                throughput(req, daemons[lg][0], c, 0.5, p)
            res: dict[tuple[str, int, int], list[tuple[float, float, float, float, float]]] = {
                k: [] for k in cells
            }
            for r in range(args.rounds):
                k = r % len(cells)
                for cell in cells[k:] + cells[:k]:
                    lg, p, c = cell
                    port, ps, _ = daemons[lg]
                    cpu0, sw0 = sum(ps.cpu_times()[:2]), ps.num_ctx_switches().involuntary
                    load = os.getloadavg()[0]
                    rps, lgcpu = throughput(req, port, c, args.seconds, p)
                    cpu = sum(ps.cpu_times()[:2]) - cpu0
                    sw = ps.num_ctx_switches().involuntary - sw0  # the daemon preempted (or yielding)
                    n = max(rps * args.seconds, 1)
                    res[cell].append((rps, cpu / n, lgcpu, load, sw / n))
                print(f"round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            for _, _, proc in daemons.values():
                proc.terminate()
                proc.wait(30)
    loads = [x[3] for v in res.values() for x in v]
    print(
        f"\ndigits-small int8 over OIP HTTP JSON, {args.rounds} interleaved rounds x "
        f"{args.seconds:g} s per cell, "
        f"load average {min(loads):.2f}-{max(loads):.2f}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'linger µs':>9} {'lg procs':>8} {'clients':>7} {'req/s p50':>10} {'min-max':>13} "
        f"{'32/16 per round':>16} {'daemon CPU/req':>15} {'daemon cores':>12} {'loadgen cores':>14} "
        f"{'invol. switches/req':>19}"
    )
    summary: dict = {"load": [min(loads), max(loads)], "cells": {}}
    for cell in cells:
        lg, p, c = cell
        rows = res[cell]
        rr = [x[0] for x in rows]
        ratio = ""
        key = f"linger{lg}/procs{p}/clients{c}"
        summary["cells"][key] = {
            "req_per_s": statistics.median(rr),
            "min": min(rr),
            "max": max(rr),
            "daemon_cpu_us_per_req": 1e6 * statistics.median(x[1] for x in rows),
        }
        if c == max(clients) and (lg, p, min(clients)) in res and c != min(clients):
            lo = [x[0] for x in res[(lg, p, min(clients))]]
            rat = [a / b for a, b in zip(rr, lo, strict=True)]
            ratio = f"{statistics.median(rat):.2f} ({min(rat):.2f}-{max(rat):.2f})"
            summary["cells"][key]["ratio_to_fewer_clients"] = {
                "median": statistics.median(rat),
                "min": min(rat),
                "max": max(rat),
            }
        print(
            f"{lg:>9} {p:8} {c:7} {statistics.median(rr):10.0f} {min(rr):6.0f}-{max(rr):<6.0f} {ratio:>16} "
            f"{1e6 * statistics.median(x[1] for x in rows):12.1f} µs "
            f"{statistics.median(x[0] * x[1] for x in rows):12.2f} "
            f"{statistics.median(x[2] for x in rows):14.2f} "
            f"{statistics.median(x[4] for x in rows):19.2f}"
        )
    if args.json:
        from bench_serving import write_json

        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
