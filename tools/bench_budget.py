"""Models under a memory budget, measured on real daemons side by side in one run.

    PYTHONPATH=. python3 tools/bench_budget.py [--requests 1500] [--rounds 2] [--json out.json]

1. Cold load from the encrypted store against a warm request, per model size (digits small, digits
   large, MobileNetV2): each model is lazy; it is unloaded (repository unload) and requested again,
   ``--cold`` times; the client-side latency of the cold request is set against the median warm one.
2. A Zipf (s = 1.1) request mix over 20 copies of the digits model that do not all fit: one daemon under
   ``memory_budget_mb`` (about 5 models; 19 lazy, 1 pinned), one with no budget (all 20 eager), the same
   seeded request sequence on both, interleaved round by round: hit rate (requests that found their
   model loaded), p50/p99 latency, failed requests (must be 0), evictions, peak RSS.
3. A small device: the daemon serving digits under memory_budget_mb = 64 with a lazy MobileNetV2,
   against both eager with no budget: RSS at ready, after digits traffic, after MobileNetV2's first
   request, and the peak (VmHWM).

Requests go over the Unix socket (binary tensors, one connection per client thread); the daemons are
real subprocesses reading a real encrypted store.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgert.client import Client
from edgert.serve import uds_frames as fr

MODELS = Path(__file__).resolve().parents[1] / "models"
SIZES = {"digits-small": "digits_small_int8.onnx", "digits-large": "digits_large_fp32.onnx",
         "mobilenetv2": "mobilenetv2_int8.onnx"}
MIX_MODELS = 20
MIX_BUDGET_MB = 10.0  # digits_large_fp32 measures about 1.5 MB loaded (the first one ~3.5): about 5 fit
ZIPF_S = 1.1
CLIENTS = 4
READY_TIMEOUT_S = 120.0


def _inputs(model: str) -> dict[str, np.ndarray]:
    if model.startswith("mobilenet"):
        return {"input": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    return {"pixels": np.load(MODELS / "digits_test.npz")["x"][:1]}


class SocketClient:
    """One persistent connection; ``infer`` returns (seconds, cold_load_ms or None, error or None)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(str(path))

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> tuple[float, float | None, str | None]:
        frame = b"".join(bytes(b) for b in fr.encode_frame(fr.INFER, {"m": model}, inputs))
        start = time.perf_counter()
        self.sock.sendall(frame)
        body_len, kind, meta_len = fr.parse_header(self._recv(fr.HEADER.size), 1 << 28)
        meta, _ = fr.decode_body(self._recv(body_len), meta_len)
        took = time.perf_counter() - start
        return took, meta.get("cold_load_ms"), str(meta["error"]) if kind == fr.ERROR else None

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("daemon closed the socket")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class Daemon:
    """``edgert daemon`` as a subprocess on a config; stderr goes to a file (never a full pipe)."""

    def __init__(self, root: Path, state: Path, name: str, budget_mb: float, models: list[dict[str, Any]]):
        self.dir = root / name
        self.dir.mkdir()
        self.sock = self.dir / "edgert.sock"
        entries = "".join("[[models]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in m.items())
                          for m in models)
        self.config = self.dir / "edgert.toml"
        self.config.write_text(
            f'[daemon]\nprofile = "cpu-generic"\nstate_dir = "{state}"\nlog_level = "warning"\n'
            f'memory_budget_mb = {budget_mb}\n[http]\nlisten = ""\n[metrics]\nlisten = ""\n'
            f'[socket]\npath = "{self.sock}"\nmode = "0600"\n{entries}')
        self.log = open(self.dir / "stderr.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "--config",
                                      str(self.config)], stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon {name} exited: {(self.dir / 'stderr.log').read_text()[-2000:]}")
            try:
                with Client(f"unix://{self.sock}") as c:
                    if c.ready():
                        return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"daemon {name} did not become ready")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        """The daemon's status document."""
        with Client(f"unix://{self.sock}") as c:
            return c.status()

    def unload(self, model: str) -> None:
        """Repository unload (a lazy model loads again on its next request)."""
        with Client(f"unix://{self.sock}") as c:
            c.unload(model)

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the daemon process in MiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def install(state: Path, models: dict[str, str]) -> None:
    """Device keys and one installed version per model name (file name under models/)."""
    from edgert.device.importing import import_plaintext
    from edgert.security.loader import open_keystore, open_store

    store = open_store(state, open_keystore(state, create=True))
    for name, filename in models.items():
        import_plaintext(store, MODELS / filename, name=name, version="1")


def cold_vs_warm(root: Path, state: Path, reps: int, warm: int) -> list[dict[str, Any]]:
    """Part 1: per model size, cold request latency from the encrypted store against warm ones."""
    d = Daemon(root, state, "cold", 64, [{"name": n, "load": "lazy"} for n in SIZES])
    rows = []
    try:
        client = SocketClient(d.sock)
        for name in SIZES:
            x = _inputs(name)
            cold, server_cold, warm_runs = [], [], []
            for _ in range(reps):
                took, cold_ms, err = client.infer(name, x)
                assert err is None and cold_ms is not None, (name, err, cold_ms)
                cold.append(took)
                server_cold.append(cold_ms / 1000)
                for _ in range(warm):
                    took, cold_ms, err = client.infer(name, x)
                    assert err is None and cold_ms is None
                    warm_runs.append(took)
                d.unload(name)
            footprint = d.status()["models"][name].get("footprint_bytes", 0)
            rows.append({"model": name, "bytes": (MODELS / SIZES[name]).stat().st_size,
                         "footprint_mb": round(footprint / 2**20, 2),
                         "cold_ms": round(statistics.median(cold) * 1000, 2),
                         "cold_load_ms_reported": round(statistics.median(server_cold) * 1000, 2),
                         "warm_ms": round(statistics.median(warm_runs) * 1000, 3),
                         "cold_over_warm": round(statistics.median(cold) / statistics.median(warm_runs), 1)})
        client.close()
    finally:
        d.stop()
    return rows


def _zipf_sequence(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** ZIPF_S for i in range(MIX_MODELS)]
    return rng.choices([f"m{i:02d}" for i in range(MIX_MODELS)], weights, k=n)


def _run_mix(d: Daemon, sequence: list[str]) -> dict[str, Any]:
    x = _inputs("digits")
    lat: list[float] = []
    cold = failed = 0
    lock = threading.Lock()

    def client(part: list[str]) -> None:
        nonlocal cold, failed
        c = SocketClient(d.sock)
        mine, my_cold, my_failed = [], 0, 0
        for name in part:
            try:
                took, cold_ms, err = c.infer(name, x)
            except Exception:
                my_failed += 1
                c.close()
                c = SocketClient(d.sock)
                continue
            mine.append(took)
            my_cold += cold_ms is not None
            my_failed += err is not None
        c.close()
        with lock:
            lat.extend(mine)
            cold += my_cold
            failed += my_failed

    threads = [threading.Thread(target=client, args=(sequence[i::CLIENTS],)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": lat, "cold": cold, "failed": failed}


def zipf_mix(root: Path, state: Path, requests: int, rounds: int) -> dict[str, Any]:
    """Part 2: the same Zipf sequence on a budgeted daemon and an unbudgeted one, interleaved."""
    names = [f"m{i:02d}" for i in range(MIX_MODELS)]
    budgeted = Daemon(root, state, "budget", MIX_BUDGET_MB,
                      [{"name": "m00", "pin": True}] + [{"name": n, "load": "lazy"} for n in names[1:]])
    unbudgeted = Daemon(root, state, "nobudget", 0, [{"name": n} for n in names])
    results: dict[str, dict[str, Any]] = {"budget": {"latencies": [], "cold": 0, "failed": 0},
                                          "no budget": {"latencies": [], "cold": 0, "failed": 0}}
    try:
        for r in range(rounds):
            sequence = _zipf_sequence(requests, seed=r)
            for label, d in (("budget", budgeted), ("no budget", unbudgeted)):
                got = _run_mix(d, sequence)
                results[label]["latencies"] += got["latencies"]
                results[label]["cold"] += got["cold"]
                results[label]["failed"] += got["failed"]
        out = {}
        for label, d in (("budget", budgeted), ("no budget", unbudgeted)):
            res = results[label]
            lat = np.asarray(res["latencies"]) * 1000
            memory = d.status().get("memory", {})
            total = requests * rounds
            out[label] = {"requests": total, "failed": res["failed"],
                          "hit_rate": round(1 - res["cold"] / total, 4),
                          "p50_ms": round(float(np.percentile(lat, 50)), 3),
                          "p99_ms": round(float(np.percentile(lat, 99)), 3),
                          "evictions": memory.get("evictions", 0), "cold_loads": memory.get("cold_loads", 0),
                          "loaded_at_end": len(memory.get("loaded", [])) if label == "budget" else MIX_MODELS,
                          "used_mb": round(memory.get("used_bytes", 0) / 2**20, 2),
                          "rss_mb": round(d.rss_mb()[0], 1), "peak_rss_mb": round(d.rss_mb()[1], 1)}
    finally:
        budgeted.stop()
        unbudgeted.stop()
    return out


def small_device(root: Path, state: Path) -> dict[str, Any]:
    """Part 3: digits + lazy MobileNetV2 under memory_budget_mb = 64, against both eager, no budget."""
    out = {}
    lazy = {"name": "mobilenetv2", "load": "lazy"}
    for label, budget, mobilenet in (("budget 64, mobilenet lazy", 64, lazy),
                                     ("no budget, both eager", 0, {"name": "mobilenetv2"})):
        d = Daemon(root, state, f"small-{budget}", budget,
                   [{"name": "digits-small", "pin": budget > 0}, mobilenet])
        try:
            row: dict[str, Any] = {"ready_rss_mb": round(d.rss_mb()[0], 1)}
            c = SocketClient(d.sock)
            x = _inputs("digits")
            for _ in range(500):
                assert c.infer("digits-small", x)[2] is None
            row["after_digits_rss_mb"] = round(d.rss_mb()[0], 1)
            img = _inputs("mobilenet")
            for _ in range(20):
                assert c.infer("mobilenetv2", img)[2] is None
            row["after_mobilenet_rss_mb"] = round(d.rss_mb()[0], 1)
            row["peak_rss_mb"] = round(d.rss_mb()[1], 1)
            st = d.status()
            row["footprints_mb"] = {n: round(m.get("footprint_bytes", 0) / 2**20, 2)
                                    for n, m in st["models"].items() if m.get("footprint_bytes")}
            c.close()
        finally:
            d.stop()
        out[label] = row
    return out


def main() -> None:
    """Run the three parts and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per round of the Zipf mix")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cold", type=int, default=5, help="cold loads per model size")
    ap.add_argument("--warm", type=int, default=50, help="warm requests after each cold one")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgert-bench-budget-"))
    try:
        state = root / "state"
        install(state, {**{n: f for n, f in SIZES.items()},
                        **{f"m{i:02d}": SIZES["digits-large"] for i in range(MIX_MODELS)}})
        cold = cold_vs_warm(root, state, args.cold, args.warm)
        print("\n1. cold load from the encrypted store vs a warm request (socket, median)")
        print(f"{'model':14} {'file KB':>8} {'footprint MB':>12} {'cold ms':>8} {'(load ms)':>9} "
              f"{'warm ms':>8} {'cold/warm':>9}")
        for r in cold:
            print(f"{r['model']:14} {r['bytes'] / 1024:8.0f} {r['footprint_mb']:12.2f} {r['cold_ms']:8.2f} "
                  f"{r['cold_load_ms_reported']:9.2f} {r['warm_ms']:8.3f} {r['cold_over_warm']:9.1f}")
        mix = zipf_mix(root, state, args.requests, args.rounds)
        print(f"\n2. Zipf(s={ZIPF_S}) mix over {MIX_MODELS} models, {CLIENTS} clients, "
              f"budget {MIX_BUDGET_MB:g} MB (~5 models) vs none")
        print(f"{'':10} {'requests':>8} {'failed':>6} {'hit rate':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'evictions':>9} {'loaded':>6} {'RSS MB':>7} {'peak MB':>7}")
        for label, r in mix.items():
            print(f"{label:10} {r['requests']:8d} {r['failed']:6d} {r['hit_rate']:8.3f} {r['p50_ms']:7.3f} "
                  f"{r['p99_ms']:7.3f} {r['evictions']:9d} {r['loaded_at_end']:6d} {r['rss_mb']:7.1f} "
              f"{r['peak_rss_mb']:7.1f}")
        small = small_device(root, state)
        print("\n3. small device: digits + MobileNetV2 (RSS MB of the daemon)")
        for label, r in small.items():
            print(f"{label:28} ready {r['ready_rss_mb']:6.1f}  after digits {r['after_digits_rss_mb']:6.1f}  "
                  f"after mobilenet {r['after_mobilenet_rss_mb']:6.1f}  peak {r['peak_rss_mb']:6.1f}  "
                  f"footprints {r['footprints_mb']}")
        if args.json:
            args.json.write_text(json.dumps({"cold": cold, "mix": mix, "small_device": small}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
