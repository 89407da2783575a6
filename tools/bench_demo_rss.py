"""Memory of ``edgert demo``: RSS at ready and after ~200 mixed requests, one tree against another.

Starts ``python -m edgert.cli.main demo`` from each tree (``PYTHONPATH=TREE``) on a free loopback
port and a temporary socket, offline, waits for ``/v2/health/ready``, reads ``/proc/PID/status`` and
``/proc/PID/smaps_rollup``, sends a fixed mix of requests (OIP JSON over HTTP to digits-small,
digits-large, the ``digits`` cascade and ``tones``; socket-frame requests to the cascade and
digits-large; one ``tones`` stream over the socket), and reads them again. With ``--baseline`` the
two daemons run side by side, started in alternating order and fed in alternating cycles, so both
see the same machine load. Prints one JSON document with per-round figures, medians, and the
candidate's delta and ratio against the baseline.

    PYTHONPATH=$PWD python3 tools/bench_demo_rss.py --baseline /work/main --rounds 3
    PYTHONPATH=$PWD python3 tools/bench_demo_rss.py --env MALLOC_ARENA_MAX=2 --baseline .  # A/B a setting
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
#: After ready and after the load, wait this long before reading memory (debounced trims, lingering
#: connections and the first metrics scrape all settle within it).
SETTLE_S = 1.5
CYCLES = 20  # 10 requests per cycle: 200 requests, plus one tones stream per daemon
STREAM_CHUNKS = 120  # 10 ms chunks of 16 kHz audio: 1.2 s, so the 1 s window fills and slides
ROLLUP_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous", "Private_Dirty", "Shared_Clean")


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, Threads (status) and the smaps_rollup totals, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    if rollup.exists():
        for line in rollup.read_text().splitlines()[1:]:
            key, _, value = line.partition(":")
            if key in ROLLUP_KEYS:
                out[f"smaps_{key}"] = int(value.split()[0])
    return out


def _json_body(name: str, x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    ).encode()


@dataclass
class Demo:
    """One ``edgert demo`` process from one tree."""

    label: str
    tree: Path
    env: dict[str, str]
    tmp: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    conn: http.client.HTTPConnection | None = None
    failures: int = 0

    @property
    def sock(self) -> Path:
        """The demo's Unix socket."""
        return self.tmp / f"{self.label}.sock"

    def start(self) -> None:
        """Start the demo (offline: loopback listeners only, no broker in its config)."""
        env = {**os.environ, "PYTHONPATH": str(self.tree), **self.env}
        cmd = [sys.executable, "-m", "edgert.cli.main", "demo", "--http", f"127.0.0.1:{self.port}",
               "--socket", str(self.sock), "--metrics", "127.0.0.1:0"]
        log = (self.tmp / f"{self.label}.log").open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)

    def wait_ready(self) -> None:
        """Poll ``/v2/health/ready`` until it answers 200."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} demo exited: see {self.tmp / (self.label + '.log')}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.conn = conn
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.label} demo not ready after {READY_TIMEOUT_S} s")

    def post(self, model: str, body: bytes) -> None:
        """One OIP JSON request on the kept-alive connection."""
        assert self.conn is not None
        self.conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        resp.read()
        if resp.status != 200:
            self.failures += 1

    def stop(self) -> None:
        """SIGTERM, then wait; kill only if it does not stop."""
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one_cycle(d: Demo, client: Any, bodies: dict[str, bytes], rng: np.random.Generator) -> int:
    """Ten requests: 6 over HTTP JSON, 4 over the socket. Returns how many were sent."""
    d.post("digits-small", bodies["pixels"])
    d.post("digits", bodies["pixels"])
    d.post("digits-large", bodies["pixels"])
    d.post("digits", bodies["pixels4"])
    d.post("digits-small", bodies["pixels4"])
    d.post("tones", bodies["audio"])
    x = rng.random((1, 64), dtype=np.float32) * 16
    client.infer("digits", {"pixels": x})
    client.infer("digits-large", {"pixels": x})
    client.infer("digits-small", {"pixels": np.repeat(x, 4, 0)})
    client.infer("digits", {"pixels": np.repeat(x, 8, 0)})
    return 10


def stream_tones(client: Any) -> int:
    """One ``tones`` stream over the socket, as in the demo's usage text; returns results received."""
    chunks = (np.zeros((1, 160), np.float32) for _ in range(STREAM_CHUNKS))
    return sum(1 for _ in client.stream("tones", chunks, window=16000, hop=1600, policy="all"))


def run_round(demos: list[Demo], settle: float, cycles: int) -> dict[str, dict[str, Any]]:
    """Start every demo, measure at ready, load them in alternating cycles, measure again."""
    from edgert.client import Client

    rng = np.random.default_rng(0)
    x1 = (rng.random((1, 64), dtype=np.float32) * 16).round()
    bodies = {
        "pixels": _json_body("pixels", x1),
        "pixels4": _json_body("pixels", np.repeat(x1, 4, 0)),
        "audio": _json_body("audio", rng.standard_normal((1, 1, 16000)).astype(np.float32)),
    }
    out: dict[str, dict[str, Any]] = {}
    try:
        for d in demos:
            d.start()
        t0 = time.monotonic()
        for d in demos:
            d.wait_ready()
        time.sleep(settle)
        for d in demos:
            assert d.proc is not None
            out[d.label] = {"ready": memory(d.proc.pid), "ready_s": round(time.monotonic() - t0, 2)}
        clients = {d.label: Client(f"unix://{d.sock}") for d in demos}
        sent = dict.fromkeys(clients, 0)
        for i in range(cycles):
            order = demos if i % 2 == 0 else demos[::-1]
            for d in order:
                sent[d.label] += one_cycle(d, clients[d.label], bodies, rng)
        for d in demos:
            out[d.label]["stream_results"] = stream_tones(clients[d.label])
            clients[d.label].close()
        time.sleep(settle)
        for d in demos:
            assert d.proc is not None
            out[d.label]["after"] = memory(d.proc.pid)
            out[d.label]["requests"] = sent[d.label]
            out[d.label]["http_failures"] = d.failures
    finally:
        for d in demos:
            d.stop()
    return out


def _median(rounds: list[dict[str, Any]], label: str, phase: str, key: str) -> float:
    return statistics.median(r[label][phase][key] for r in rounds)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--env {p!r}: expected KEY=VALUE")
        env[key] = value
    return env


def main() -> None:
    """Run the rounds and print the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="the candidate tree (default: this one)")
    ap.add_argument("--baseline", type=Path, default=None, help="a second tree, run side by side")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for the candidate")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="K=V")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=CYCLES, help="10 requests per cycle")
    ap.add_argument("--settle", type=float, default=SETTLE_S)
    ap.add_argument("--json", type=Path, default=None, help="also write a summary to this file")
    args = ap.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-demo-rss-") as tmp:
        for r in range(args.rounds):
            demos = [Demo("candidate", args.tree.resolve(), _parse_env(args.env), Path(tmp))]
            if args.baseline is not None:
                base_env = _parse_env(args.baseline_env)
                demos.append(Demo("baseline", args.baseline.resolve(), base_env, Path(tmp)))
            if r % 2:
                demos.reverse()  # alternate who starts first
            rounds.append(run_round(demos, args.settle, args.cycles))
    labels = ["candidate"] + (["baseline"] if args.baseline is not None else [])
    keys = ["VmRSS", "RssAnon", "RssFile", "Threads", "smaps_Pss"]
    phases = ("ready", "after")
    medians = {lab: {ph: {k: _median(rounds, lab, ph, k) for k in keys} for ph in phases} for lab in labels}
    result: dict[str, Any] = {
        "unit": "kB (Threads: count)",
        "candidate": {"tree": str(args.tree.resolve()), "env": _parse_env(args.env)},
        "rounds": rounds,
        "median": medians,
        "target_kB": 80 * 1000,
    }
    if args.baseline is not None:
        result["baseline"] = {"tree": str(args.baseline.resolve()), "env": _parse_env(args.baseline_env)}
        cand, base = medians["candidate"], medians["baseline"]
        result["delta_kB"] = {ph: cand[ph]["VmRSS"] - base[ph]["VmRSS"] for ph in phases}
        result["ratio"] = {
            ph: round(medians["candidate"][ph]["VmRSS"] / medians["baseline"][ph]["VmRSS"], 4)
            for ph in ("ready", "after")
        }
    print(json.dumps(result, indent=1))
    if args.json:  # for tools/bench_issue10.py; VmRSS is in kB, shown in MB as above
        cand = medians["candidate"]
        ready, after = cand["ready"], cand["after"]
        args.json.write_text(json.dumps({
            "rss_ready_mb": ready["VmRSS"] / 1000, "rss_after_mb": after["VmRSS"] / 1000,
            "anon_after_mb": after["RssAnon"] / 1000, "file_after_mb": after["RssFile"] / 1000,
            "threads": after["Threads"], "rounds": args.rounds,
        }, indent=2) + "\n")
    summary = {lab: {ph: f"{medians[lab][ph]['VmRSS'] / 1000:.1f} MB" for ph in phases} for lab in labels}
    print(json.dumps({"summary": summary, "delta_kB": result.get("delta_kB"), "ratio": result.get("ratio")}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
