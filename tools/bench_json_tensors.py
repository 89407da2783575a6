"""MobileNetV2 int8 over OIP JSON (a 1.6 MB request) against bare onnxruntime, in one interleaved run.

Rows (issue 10, DESIGN §5): p50 at one client, server CPU per request, RSS idle / peak at 32 clients /
after the run (and how long it took to come back within 15% of idle). ``--baseline PATH`` runs a second
daemon from another checkout (e.g. /work/main) side by side, interleaved request by request, so both
trees see the same load from whatever else runs on this shared machine.

    python tools/bench_json_tensors.py [--quick] [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import psutil
from bench_serving import daemon_config, free_port, spawn_daemon
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "mobilenetv2_int8.onnx"
#: Pause after each bare run so its spinning intra-op threads have gone to sleep before the next call.
SPIN_SETTLE_S = 0.02
#: RSS counts as back at idle within this fraction (issue 10).
RSS_BACK_FRACTION = 0.15


def json_request(x: np.ndarray) -> bytes:
    """The request as tritonclient / orjson clients write it: shortest float32 reprs, 1.6 MB."""
    body = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel()}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return (
        b"POST /v2/models/mobilenet/infer HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


class Daemon:
    """An edgert daemon from ``tree`` serving MobileNetV2 on its own port, in its own process."""

    def __init__(
        self, tree: Path, tmp: Path, models: str | None = None, profile: str = "cpu-generic"
    ) -> None:
        tmp.mkdir()
        self.port = free_port()
        models = models or f'[[models]]\nname = "mobilenet"\npath = "{MODEL}"\n'
        cfg = daemon_config(tmp, models, http=f"127.0.0.1:{self.port}", profile=profile)
        self.proc = spawn_daemon(cfg, tree)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"daemon from {tree} did not listen")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def call(self, req: bytes) -> bytes:
        self.sock.sendall(req)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end]).lower()
                i = head.find(b"content-length:")
                n = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
                if len(self.buf) >= end + 4 + n:
                    body = bytes(self.buf[end + 4 : end + 4 + n])
                    del self.buf[: end + 4 + n]
                    if not head.startswith(b"http/1.1 200"):
                        raise RuntimeError(body[:300])
                    return body
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6

    def stop(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.wait(30)


def one_client(daemons: dict[str, Daemon], req: bytes, x: np.ndarray, n: int) -> dict:
    """Interleaved: bare session.run, then each daemon, per round; p50 and CPU per request each."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as edgert imports it
    import onnxruntime as ort

    # "bare": onnxruntime's defaults (intra-op threads spin after each run: the floor). "bare_nospin":
    # spinning off, as the daemon's cpu-generic profile runs it. A spinning pool keeps a core busy after
    # its run, so the next call (a daemon's) pauses SPIN_SETTLE_S first, or it would pay for bare's spin.
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    nospin = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
    bares = {"bare": sess, "bare_nospin": nospin}
    lat: dict[str, list[float]] = {**{k: [] for k in bares}, **{k: [] for k in daemons}}
    cpu: dict[str, float] = dict.fromkeys(lat, 0.0)
    for i in range(n + 5):
        for name, session in bares.items():
            t, c = time.perf_counter(), time.process_time()
            session.run(None, {"input": x})
            if i >= 5:
                lat[name].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
            time.sleep(SPIN_SETTLE_S)
        for name, d in daemons.items():
            c0 = d.cpu()
            t = time.perf_counter()
            d.call(req)
            if i >= 5:
                lat[name].append(time.perf_counter() - t)
                cpu[name] += d.cpu() - c0
    bare = float(np.median(lat["bare"]))
    bare_nospin = float(np.median(lat["bare_nospin"]))
    out = {}
    for name, xs in lat.items():
        p50 = float(np.median(xs))
        out[name] = {
            "p50_ms": round(p50 * 1e3, 2),
            "ratio_to_bare": round(p50 / bare, 2),
            "ratio_to_bare_nospin": round(p50 / bare_nospin, 2),
            "cpu_ms_per_req": round(cpu[name] / n * 1e3, 2),
            "cpu_ratio_to_bare": round(cpu[name] / cpu["bare"], 2),
        }
    return out


def load_and_memory(d: Daemon, req: bytes, body_len: int, clients: int, secs: float) -> dict:
    """RSS idle, peak during ``clients`` concurrent clients, and after; time to get back within 15%."""
    idle = d.rss_mb()
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], d.rss_mb())
            time.sleep(0.01)

    th = threading.Thread(target=sample)
    th.start()
    rps, gen_cpu = throughput(req, d.port, clients, secs)
    stop.set()
    th.join()
    after = d.rss_mb()
    t0 = time.monotonic()
    back = None
    while time.monotonic() - t0 < 10:
        if d.rss_mb() <= idle * (1 + RSS_BACK_FRACTION):
            back = round(time.monotonic() - t0, 2)
            break
        time.sleep(0.05)
    return {
        "clients": clients,
        "req_per_s": round(rps, 1),
        "loadgen_cpu_cores": round(gen_cpu, 2),
        "rss_idle_mb": round(idle, 1),
        "rss_peak_mb": round(peak[0], 1),
        "peak_per_inflight_x_request": round((peak[0] - idle) * 1e6 / clients / body_len, 2),
        "rss_right_after_mb": round(after, 1),
        "rss_after_10s_mb": round(d.rss_mb(), 1),
        "s_to_within_15pct_of_idle": back,
    }


def codec(x: np.ndarray, n: int) -> dict:
    """In one process: decoding the 1.6 MB request and encoding a tensor of the same size as JSON output,
    edgert's codec against what a plain Python OIP server does (orjson or json with lists), medians."""
    import json as stdjson

    from edgert.serve.oip_codec import decode_infer_request, encode_infer_response

    req = json_request(x)
    body = req[req.find(b"\r\n\r\n") + 4 :]
    flat = x.ravel()

    def orjson_numpy() -> np.ndarray:
        doc = orjson.loads(body)
        return np.asarray(doc["inputs"][0]["data"], dtype=np.float32).reshape(doc["inputs"][0]["shape"])

    cases = {
        "decode_edgert": lambda: decode_infer_request(body),
        "decode_orjson_then_numpy": orjson_numpy,
        "encode_edgert": lambda: encode_infer_response("m", "1", {"out": x}),
        "encode_orjson_tolist": lambda: orjson.dumps({"outputs": [{"data": flat.tolist()}]}),
        "encode_json_tolist": lambda: stdjson.dumps({"outputs": [{"data": flat.tolist()}]}),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(n + 2):
        for name, fn in cases.items():
            if name == "encode_json_tolist" and i >= 3:
                continue  # ~100 ms each: three are enough
            t = time.perf_counter()
            fn()
            if i >= 2 or name == "encode_json_tolist":
                times[name].append(time.perf_counter() - t)
    out = {k: round(1e3 * float(np.median(v)), 2) for k, v in times.items()}
    out["decode_speedup_vs_orjson"] = round(out["decode_orjson_then_numpy"] / out["decode_edgert"], 2)
    out["encode_speedup_vs_orjson_tolist"] = round(out["encode_orjson_tolist"] / out["encode_edgert"], 2)
    return {"ms": out, "n": n}


def run(quick: bool, baseline: Path | None) -> dict:
    """All rows, every tree side by side."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    req = json_request(x)
    body_len = len(req) - req.find(b"\r\n\r\n") - 4
    trees = {"edgert": REPO, **({"baseline": baseline} if baseline else {})}
    report: dict = {"request_bytes": body_len, "cpus": os.cpu_count()}
    report["codec_in_process"] = codec(x, 10 if quick else 30)
    with tempfile.TemporaryDirectory() as tmpdir:
        daemons = {k: Daemon(v, Path(tmpdir) / k) for k, v in trees.items()}
        try:
            for d in daemons.values():
                for _ in range(3):
                    d.call(req)  # warm-up; also checks the answer is a 200
            report["one_client"] = one_client(daemons, req, x, 40 if quick else 200)
            for name, d in daemons.items():
                report[f"load_{name}"] = load_and_memory(d, req, body_len, 32, 3.0 if quick else 6.0)
        finally:
            for d in daemons.values():
                d.stop()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to run side by side")
    args = ap.parse_args()
    print(json.dumps(run(args.quick, args.baseline), indent=2))


if __name__ == "__main__":
    main()
