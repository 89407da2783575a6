"""Serving benchmark: in-process vs Unix socket vs OIP HTTP, throughput, MobileNetV2 binary, cold start, RSS.

All numbers come from one run on this machine, side by side. The daemon runs as a separate process;
load generators are separate processes with pre-built requests (low per-request CPU, reported).

    python tools/bench_serving.py [--quick] [--plots docs/]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


def free_port() -> int:
    """A free loopback TCP port (other benchmarks may run on this machine at the same time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = free_port()


def write_json(path: Path, data: object) -> None:
    """Write a benchmark's summary for tools/bench_issue10.py (``--json PATH`` on each script)."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def daemon_config(
    tmp: Path,
    models: str,
    *,
    http: str = "",
    metrics: str = "",
    socket_path: Path | None = None,
    log_level: str = "warning",
    profile: str = "cpu-generic",
    plaintext: bool = True,
) -> Path:
    """Write the benchmark daemons' edgert.toml into ``tmp`` (state in tmp/state) and return its path.

    ``models`` is the ``[[models]]`` TOML; listeners are off unless given (``http``/``metrics`` as
    HOST:PORT, ``socket_path`` for the Unix socket).
    """
    cfg = tmp / "edgert.toml"
    cfg.write_text(f"""
[daemon]
profile = "{profile}"
state_dir = "{tmp / "state"}"
allow_plaintext = {"true" if plaintext else "false"}
log_level = "{log_level}"
[http]
listen = "{http}"
[metrics]
listen = "{metrics}"
[socket]
path = "{socket_path or ""}"
{models}
""")
    return cfg


def spawn_daemon(cfg: Path, tree: Path | None = None, env: dict[str, str] | None = None,
                 **popen: Any) -> subprocess.Popen[bytes]:
    """``edgert daemon -c cfg`` in its own process, from ``tree`` (PYTHONPATH) if given."""
    full = {**os.environ, **(env or {}), **({"PYTHONPATH": str(tree)} if tree else {})}
    cmd = [sys.executable, "-m", "edgert.cli.main", "daemon", "-c", str(cfg)]
    return subprocess.Popen(cmd, env=full, **popen)


def start_daemon(tmp: Path, models: str, notify: str | None = None) -> subprocess.Popen[bytes]:
    """This script's daemon: HTTP on PORT and the Unix socket, ``models`` as given."""
    cfg = daemon_config(tmp, models, http=f"127.0.0.1:{PORT}", socket_path=tmp / "edgert.sock")
    return spawn_daemon(cfg, env={"NOTIFY_SOCKET": notify} if notify else None)


def wait_ready(sock_path: Path, timeout: float = 60) -> None:
    from edgert.client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client(f"unix://{sock_path}") as c:
                if c.ready():
                    return
        except Exception:
            time.sleep(0.02)
    raise RuntimeError("daemon not ready")


def json_request(model: str, x: np.ndarray) -> bytes:
    body = json.dumps(
        {
            "inputs": [
                {"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
            ]
        }
    ).encode()
    return (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one HTTP response off a keep-alive socket (Content-Length framed)."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
            if len(buf) >= end + 4 + n:
                del buf[: end + 4 + n]
                return
        chunk = sock.recv(262144)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def time_http(req: bytes, n: int, port: int | None = None) -> list[float]:
    """``n`` sequential round trips of ``req`` on one keep-alive connection (seconds each)."""
    s = socket.create_connection(("127.0.0.1", PORT if port is None else port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(req)
        read_response(s, buf)
        out.append(time.perf_counter() - t)
    s.close()
    return out


def bench_digits(args: argparse.Namespace, report: dict, tmp: Path) -> dict:
    """p50 of in-process ``Model.infer``, the socket client and raw HTTP JSON, interleaved per request.

    Round-robin over the three paths, so load spikes from other work on this shared machine hit all
    three alike; the added cost is each path's p50 minus the in-process p50.
    """
    from edgert import ModelOptions, Runtime
    from edgert.client import Client

    x1 = np.load(MODELS / "digits_test.npz")["x"][:1]
    n = 1500 if args.quick else 5000
    model = Runtime("cpu-generic").load(MODELS / "digits_small_int8.onnx", options=ModelOptions(threads=1))
    req = json_request("digits", x1)
    sock = socket.create_connection(("127.0.0.1", PORT))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    out: dict[str, list[float]] = {"inproc": [], "uds": [], "http_json": []}
    with Client(f"unix://{tmp / 'edgert.sock'}") as c:
        paths = {
            "inproc": lambda: model.infer({"pixels": x1}),
            "uds": lambda: c.infer("digits", {"pixels": x1}),
            "http_json": lambda: (sock.sendall(req), read_response(sock, buf)),
        }
        for i in range(n + 300):
            for name, call in paths.items():
                t = time.perf_counter()
                call()
                if i >= 300:
                    out[name].append(time.perf_counter() - t)
    sock.close()
    model.close()
    p50 = {k: pct(v, 50) * 1e6 for k, v in out.items()}
    report["digits_p50_us"] = {k: round(v, 1) for k, v in p50.items()}
    report["digits_added_p50_us"] = {
        "uds": round(p50["uds"] - p50["inproc"], 1),
        "http_json": round(p50["http_json"] - p50["inproc"], 1),
    }
    return out


def bench_throughput(args: argparse.Namespace, report: dict) -> dict[int, float]:
    """HTTP JSON req/s by client count; at 32 clients also the profile's default threads, alternated."""
    x1 = np.load(MODELS / "digits_test.npz")["x"][:1]
    req = json_request("digits", x1)
    secs = 2.0 if args.quick else 4.0
    curve = {}
    for clients in (1, 8, 32, 64) if not args.quick else (1, 32):
        rps, _ = throughput(req, PORT, clients, secs)
        curve[clients] = rps
    rounds: dict[str, list[tuple[float, float]]] = {"digits": [], "digits-profile-threads": []}
    for _ in range(2 if args.quick else 3):
        for name in rounds:
            rounds[name].append(throughput(json_request(name, x1), PORT, 32, secs))
    med = {
        k: (float(np.median([r for r, _ in v])), float(np.median([c for _, c in v])))
        for k, v in rounds.items()
    }
    report["http_json_32_clients"] = {
        "req_per_s": round(med["digits"][0]),
        "loadgen_cpu_cores": round(med["digits"][1], 2),
        "req_per_s_profile_default_threads": round(med["digits-profile-threads"][0]),
    }
    report["http_json_rps_by_clients"] = {str(k): round(v) for k, v in curve.items()}
    return curve


def bench_mobilenet(args: argparse.Namespace, report: dict) -> None:
    """MobileNetV2 int8: bare ``session.run`` vs our client over HTTP (binary extension), interleaved."""
    from edgert import Runtime
    from edgert.client import Client

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    n = 40 if args.quick else 150
    model = Runtime("cpu-generic").load(MODELS / "mobilenetv2_int8.onnx")
    bare, http = [], []
    with Client(f"http://127.0.0.1:{PORT}") as c:
        for i in range(n + 5):
            t = time.perf_counter()
            model.run({"input": x})
            if i >= 5:
                bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.infer("mobilenet", {"input": x})
            if i >= 5:
                http.append(time.perf_counter() - t)
    model.close()
    report["mobilenet_p50_ms"] = {
        "bare": round(pct(bare, 50) * 1e3, 2),
        "http_binary": round(pct(http, 50) * 1e3, 2),
        "ratio": round(pct(http, 50) / pct(bare, 50), 3),
    }


def bench_cold_start(report: dict) -> None:
    """Popen to READY=1 with three encrypted models from the store."""
    from edgert.device.importing import import_plaintext
    from edgert.security.loader import open_keystore, open_store

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        state = tmp / "state"
        store = open_store(state, open_keystore(state, create=True))
        names = {
            "digits-small": "digits_small_int8.onnx",
            "digits-large": "digits_large_int8.onnx",
            "mobilenet": "mobilenetv2_int8.onnx",
        }
        for name, f in names.items():
            import_plaintext(store, MODELS / f, name=name)
        models = "".join(f'[[models]]\nname = "{n}"\n' for n in names)
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        addr = f"edgert-bench-{os.getpid()}"
        ns.bind(b"\0" + addr.encode())
        t0 = time.perf_counter()
        proc = start_daemon(tmp, models, notify="@" + addr)
        ns.settimeout(60)
        while b"READY=1" not in ns.recv(4096):
            pass
        ready = time.perf_counter() - t0
        ns.close()
        import psutil

        report["cold_start_3_encrypted_s"] = round(ready, 3)
        report["daemon_rss_mb_3_models_http_up"] = round(psutil.Process(proc.pid).memory_info().rss / 1e6, 1)
        proc.terminate()
        proc.wait(30)


def plots(dist: dict, curve: dict[int, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, xs in dist.items():
        us = np.array(xs) * 1e6
        ax.hist(
            us[us < np.percentile(us, 99.5)],
            bins=80,
            histtype="step",
            label=f"{name} (p50 {np.median(us):.0f} µs)",
        )
    ax.set_xlabel("round trip, µs (digits, 1 row, 1 client)")
    ax.set_ylabel("requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serving_latency.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(curve)
    ax.plot(ks, [curve[k] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent HTTP clients")
    ax.set_ylabel("req/s (digits, OIP JSON)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serving_throughput.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plots", type=Path, default=None, help="write PNGs into this directory")
    ap.add_argument(
        "--baseline", type=Path, default=None, help="JSON MobileNetV2 rows: run this checkout too"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    args = ap.parse_args()
    report: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # threads = 1 for digits: a ~20 us model gains nothing from a second intra-op thread, and
        # that thread's spin-wait takes the core the event loop needs (see docs/serving.md).
        models = (
            f'[[models]]\nname = "digits"\npath = "{MODELS / "digits_small_int8.onnx"}"\nthreads = 1\n'
            f'[[models]]\nname = "digits-profile-threads"\npath = "{MODELS / "digits_small_int8.onnx"}"\n'
            f'[[models]]\nname = "mobilenet"\npath = "{MODELS / "mobilenetv2_int8.onnx"}"\n'
        )
        proc = start_daemon(tmp, models)
        try:
            wait_ready(tmp / "edgert.sock")
            dist = bench_digits(args, report, tmp)
            curve = bench_throughput(args, report)
            bench_mobilenet(args, report)
        finally:
            proc.terminate()
            proc.wait(30)
    bench_cold_start(report)
    from bench_json_tensors import run as bench_json_mobilenet

    report["mobilenet_json"] = bench_json_mobilenet(args.quick, args.baseline)
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)
    if args.plots:
        plots(dist, curve, args.plots)


if __name__ == "__main__":
    main()
