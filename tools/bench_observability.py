"""Overhead of per-request statistics, trace context and CPU sampling on digits, and cost per inference.

"on" is this tree; "off" is the same project just before the observability work (``--baseline-ref``;
by default the parent of the commit that added edgert/engine/stats.py), exported with ``git archive``
into a temporary directory. Each measurement runs in its own subprocess with PYTHONPATH pointing at
its tree, and the rounds alternate (off, on, off, on, ...) so that both sides see the same machine.
Reported: medians of the rounds and the on/off ratios, for

1. in-process ``Engine.infer_sync`` on digits-small (us per call, process CPU per call);
2. OIP HTTP JSON, one client: p50 round trip;
3. OIP HTTP JSON, 32 clients (tools/loadgen.py, separate processes): req/s and the daemon's CPU
   per request (from /proc/PID/stat: the whole process, HTTP parsing included);
4. cost per inference from the "on" daemon itself: ``edgert_inference_cpu_*_seconds`` (sampled);
5. the added work per request, timed in this process (``--micro-only`` runs just this): on a
   shared 2-core machine it is far below the noise of the end-to-end rows.

    python tools/bench_observability.py [--rounds 3] [--seconds 3] [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from bench_serving import daemon_config, free_port, json_request, pct, spawn_daemon, time_http
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
DIGITS = MODELS / "digits_small_int8.onnx"
#: Calls per in-process round and requests per one-client HTTP round.
INPROC_CALLS = 20000
HTTP_ONE_CLIENT_REQUESTS = 2000
CLIENTS = 32

INPROC = f"""
import json, time, numpy as np
from edgert.engine import Engine, ModelConfig
from edgert.metrics import Metrics
from edgert.runtime import Runtime
model = Runtime("cpu-generic").load("{DIGITS}", name="digits")
engine = Engine(Metrics())
engine.add_model(model, ModelConfig(name="digits"))
x = {{"pixels": np.load("{MODELS / "digits_test.npz"}")["x"][:1]}}
for _ in range(500):
    engine.infer_sync("digits", x)
c0, t0 = time.process_time(), time.perf_counter()
for _ in range({INPROC_CALLS}):
    engine.infer_sync("digits", x)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
n = {INPROC_CALLS}
print(json.dumps({{"us_per_call": wall / n * 1e6, "cpu_us_per_call": cpu / n * 1e6}}))
engine.close()
"""


def baseline_ref() -> str:
    """The parent of the commit that added edgert/engine/stats.py."""
    out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "edgert/engine/stats.py"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not out:
        raise SystemExit("edgert/engine/stats.py is not committed; pass --baseline-ref")
    return out[-1] + "^"


def export(ref: str, into: Path) -> Path:
    """``git archive REF`` unpacked under ``into``: the baseline tree."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "edgert", "device_profiles"], cwd=REPO,
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def inproc(tree: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", INPROC], env=env_for(tree), capture_output=True, text=True,
                         check=True, timeout=600)
    doc: dict[str, float] = json.loads(out.stdout)
    return doc


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_round(tree: Path, tmp: Path, seconds: float, on: bool) -> dict[str, float]:
    port, mport = free_port(), free_port()
    models = f'[[models]]\nname = "digits"\npath = "{DIGITS}"\n'
    cfg = daemon_config(
        tmp, models, http=f"127.0.0.1:{port}", metrics=f"127.0.0.1:{mport}", socket_path=tmp / "edgert.sock"
    )
    proc = spawn_daemon(cfg, tree)
    try:
        wait_http(port)
        x = np.load(MODELS / "digits_test.npz")["x"][:1]
        req = json_request("digits", x)
        one = time_http(req, HTTP_ONE_CLIENT_REQUESTS, port)
        cpu0 = proc_cpu_seconds(proc.pid)
        rps, gen_cpu = throughput(req, port, CLIENTS, seconds)
        cpu = proc_cpu_seconds(proc.pid) - cpu0
        doc = {"http_p50_us": pct(one, 50) * 1e6, "rps": rps, "loadgen_cores": gen_cpu,
               "daemon_cpu_us_per_req": cpu / (rps * seconds) * 1e6}
        if on:
            doc.update(cost_gauges(mport))
        return doc
    finally:
        proc.terminate()
        proc.wait(30)


def wait_http(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("daemon not ready")


def cost_gauges(mport: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = dict(re.findall(r'^edgert_(inference_cpu_\w+)\{model="digits"\} (\S+)$', text, re.M))
    return {k: float(v) * (1 if k.endswith("samples") else 1e6) for k, v in found.items()}


def median(rows: list[dict[str, float]], key: str) -> float:
    return float(np.median([r[key] for r in rows if key in r]))


def best(rows: list[dict[str, float]], key: str) -> float:
    """The least disturbed round: noise from other processes only ever slows a round down."""
    values = [r[key] for r in rows if key in r]
    return float(max(values) if key == "rps" else min(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each 32-client run")
    ap.add_argument("--baseline-ref", default=None, help="git ref without the observability work")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--micro-only", action="store_true", help="only time the added work per request")
    args = ap.parse_args()
    if args.micro_only:
        print(json.dumps(micro(), indent=2))
        return
    ref = args.baseline_ref or baseline_ref()
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = {"off": export(ref, tmp / "baseline"), "on": REPO}
        results: dict[str, dict[str, list[dict[str, float]]]] = {
            side: {"inproc": [], "daemon": []} for side in trees
        }
        for i in range(args.rounds):
            for side in ("off", "on"):
                results[side]["inproc"].append(inproc(trees[side]))
                work = tmp / f"{side}{i}"
                work.mkdir()
                results[side]["daemon"].append(daemon_round(trees[side], work, args.seconds, side == "on"))
                print(f"round {i + 1}/{args.rounds} {side}: {results[side]['inproc'][-1]} "
                      f"{results[side]['daemon'][-1]}", file=sys.stderr)
    report = summarise(results, sha, args)
    report["added_work_us"] = micro()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def summarise(results: dict, sha: str, args: argparse.Namespace) -> dict:
    rows = {}
    for key, part in (("us_per_call", "inproc"), ("cpu_us_per_call", "inproc"), ("http_p50_us", "daemon"),
                      ("rps", "daemon"), ("daemon_cpu_us_per_req", "daemon"), ("loadgen_cores", "daemon")):
        off, on = median(results["off"][part], key), median(results["on"][part], key)
        b_off, b_on = best(results["off"][part], key), best(results["on"][part], key)
        rows[key] = {"off": round(off, 2), "on": round(on, 2), "on/off": round(on / off, 3) if off else None,
                     "best off": round(b_off, 2), "best on": round(b_on, 2),
                     "best on/off": round(b_on / b_off, 3) if b_off else None}
    cost = {k: round(median(results["on"]["daemon"], k), 2) for k in results["on"]["daemon"][-1]
            if k.startswith("inference_cpu")}
    return {"baseline": sha, "rounds": args.rounds, "seconds": args.seconds, "clients": CLIENTS,
            "compare": rows, "cost_per_inference_us": cost}


def print_report(report: dict) -> None:
    print(f"baseline {report['baseline']} (off) vs this tree (on); "
          f"{report['rounds']} interleaved rounds: medians, and the best round of each side")
    labels = {
        "us_per_call": "in-process infer_sync, us/call",
        "cpu_us_per_call": "in-process CPU, us/call",
        "http_p50_us": "HTTP JSON 1 client p50, us",
        "rps": f"HTTP JSON {report['clients']} clients, req/s",
        "daemon_cpu_us_per_req": "daemon CPU per request, us",
        "loadgen_cores": "load generator, cores",
    }
    for key, row in report["compare"].items():
        print(f"  {labels[key]:<36} off {row['off']:>9}  on {row['on']:>9}  on/off {row['on/off']:<6}"
              f"  best: off {row['best off']:>9}  on {row['best on']:>9}  on/off {row['best on/off']}")
    print("cost per inference (on, sampled, us of CPU per request):")
    for key, value in sorted(report["cost_per_inference_us"].items()):
        print(f"  {key:<36} {value}")
    print("added work per request (this tree, timed in-process, us):")
    for key, value in report["added_work_us"].items():
        print(f"  {key:<36} {value}")


def micro(n: int = 200_000) -> dict[str, float]:
    """Microseconds of the work this feature adds to one request, timed with timeit in this process."""
    import timeit

    sys.path.insert(0, str(REPO))
    from edgert.engine.stats import InferenceStats
    from edgert.metrics.timing import RequestTiming, Tracer

    tracer, stats = Tracer(100.0), InferenceStats()
    done = RequestTiming()
    done.model, done.version, done.rows, done.batch_size, done.infer_ns = "digits", "1", 1, 1, 1000
    done.finished_ns = done.received_ns + 50_000

    def transport() -> None:
        t = tracer.start("http", None)
        tracer.reply_traceparent(t)
        tracer.finish(t, 200)

    def stamps() -> None:  # the monotonic reads the engine adds: admit, validate, run x2, output x2
        for _ in range(6):
            time.monotonic_ns()

    cases = {"transport: trace ids, header, slow check": transport,
             "engine: record one request": lambda: stats.record(done, True),
             "engine: six stage stamps": stamps}
    out = {name: round(min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6, 3) for name, fn in cases.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


if __name__ == "__main__":
    main()
