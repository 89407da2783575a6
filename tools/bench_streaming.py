"""Streaming benchmark: 30 fps MobileNetV2 int8 with ``latest`` (one and two streams) and a 1 s / 100 ms
audio window over the tone model, each beside the model's own run time measured in this run.

The daemon is a separate process serving plaintext sample models on a Unix socket; the senders pace
frames and chunks in real time from this process.

    python tools/bench_streaming.py [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_serving import daemon_config, spawn_daemon, wait_ready

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
FPS = 30
FRAME_SHAPE = (3, 224, 224)
RATE, CHUNK, WINDOW, HOP = 16_000, 160, 16_000, 1_600
BARE_RUNS = 200


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def start_daemon(tmp: Path) -> subprocess.Popen[bytes]:
    models = (
        f'[[models]]\nname = "mobilenetv2"\npath = "{MODELS / "mobilenetv2_int8.onnx"}"\n'
        f'[[models]]\nname = "tones"\npath = "{MODELS / "tones_int8.onnx"}"\nthreads = 1\n'
    )
    return spawn_daemon(daemon_config(tmp, models, socket_path=tmp / "edgert.sock"))


def bare_ms(model: str, x: np.ndarray, threads: int | None) -> float:
    """p50 of bare onnxruntime runs of ``model`` on ``x`` (ms), measured in this process."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as edgert imports it
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(MODELS / model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(10):
        sess.run(None, {name: x})
    times = []
    for _ in range(BARE_RUNS):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1000)
    return pct(times, 50)


def paced(items: list[Any], period_s: float, start: float) -> Any:
    """Yield (id, send time, item) at ``period_s`` intervals from ``start`` (perf_counter)."""
    for i, item in enumerate(items):
        due = start + i * period_s
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i, time.perf_counter(), item


def video_stream(sock: Path, seconds: float, out: dict[str, Any], key: str) -> None:
    from edgert.client import Client

    rng = np.random.default_rng(0)
    frames = [rng.standard_normal(FRAME_SHAPE).astype(np.float32) for _ in range(8)]
    n = int(seconds * FPS)
    items = [frames[i % len(frames)] for i in range(n)]
    latencies, run_ms, received = [], [], 0
    start = time.perf_counter()
    with Client(f"unix://{sock}", timeout=60) as c:
        stream = c.stream("mobilenetv2", paced(items, 1 / FPS, start), policy="latest")
        for r in stream:
            now = time.perf_counter()
            if r.error is None:
                received += 1
                latencies.append((now - r.ts) * 1000)
                run_ms.append(r.run_ms)
    elapsed = time.perf_counter() - start
    dropped = stream.ended.dropped if stream.ended else -1
    out[key] = {
        "frames_sent": n,
        "results": received,
        "dropped": dropped,
        "drop_rate_pct": round(100 * dropped / n, 1),
        "delivered_fps": round(received / elapsed, 1),
        "latency_ms_p50": round(pct(latencies, 50), 2),
        "latency_ms_p99": round(pct(latencies, 99), 2),
        "server_run_ms_p50": round(pct(run_ms, 50), 2),
    }


def audio_stream(sock: Path, seconds: float) -> dict[str, Any]:
    from edgert.client import Client

    rng = np.random.default_rng(1)
    signal = (rng.standard_normal(int(seconds * RATE)) * 0.05).astype(np.float32)
    chunks = [signal[i : i + CHUNK][None, :] for i in range(0, len(signal) - CHUNK + 1, CHUNK)]
    latencies, run_ms = [], []
    start = time.perf_counter()
    with Client(f"unix://{sock}", timeout=60) as c:
        stream = c.stream("tones", paced(chunks, CHUNK / RATE, start), window=WINDOW, hop=HOP, policy="all")
        for r in stream:
            latencies.append((time.perf_counter() - r.ts) * 1000)  # from the hop's last chunk being sent
            run_ms.append(r.run_ms)
    return {
        "chunks_sent": len(chunks),
        "results": len(latencies),
        "expected_results": (len(chunks) * CHUNK - WINDOW) // HOP + 1,
        "hop_latency_ms_p50": round(pct(latencies, 50), 2),
        "hop_latency_ms_p99": round(pct(latencies, 99), 2),
        "server_run_ms_p50": round(pct(run_ms, 50), 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON document."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each stream (default 10)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_daemon(Path(tmp))
        sock = Path(tmp) / "edgert.sock"
        try:
            wait_ready(sock)
            # the models' own time, side by side (same machine, same run)
            report["mobilenetv2_bare_ms_p50"] = round(
                bare_ms("mobilenetv2_int8.onnx", np.zeros((1, *FRAME_SHAPE), np.float32), None), 2
            )
            report["tones_bare_ms_p50"] = round(
                bare_ms("tones_int8.onnx", np.zeros((1, 1, WINDOW), np.float32), 1), 3
            )
            one: dict[str, Any] = {}
            video_stream(sock, args.seconds, one, "stream")
            report["video_30fps_latest_one_stream"] = one["stream"]
            two: dict[str, Any] = {}
            threads = [
                threading.Thread(target=video_stream, args=(sock, args.seconds, two, f"stream{i}"))
                for i in (1, 2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report["video_30fps_latest_two_streams"] = two
            audio = audio_stream(sock, args.seconds)
            audio["hop_latency_beyond_bare_model_ms_p50"] = round(
                audio["hop_latency_ms_p50"] - report["tones_bare_ms_p50"], 2
            )
            report["audio_window_1s_hop_100ms"] = audio
        finally:
            proc.terminate()
            proc.wait(30)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
