"""int8 against fp32, measured side by side in one run: MobileNetV2 latency and cosine, digits accuracy drop.

    python tools/bench_int8.py [--threads 2] [--rounds 200]

The fp32 MobileNetV2 is git-ignored; if models/generated/mobilenetv2_fp32.onnx is missing it is built with
``tools/make_models.py --mobilenet-fp32``, which needs torch (the ``models`` extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FP32 = MODELS / "generated" / "mobilenetv2_fp32.onnx"
INT8 = MODELS / "mobilenetv2_int8.onnx"
WARMUP = 10
COSINE_INPUTS = 16
INPUT_SEED = 1234  # differs from the calibration seed used by make_models.py
TARGET_SPEEDUP = 2.0
TARGET_COSINE = 0.99
MAX_DIGITS_DROP_PT = 0.5


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session from bytes with a fixed thread count (sequential execution, as a device would run it)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path.read_bytes(), opts, providers=["CPUExecutionProvider"])


def ensure_fp32() -> None:
    """Build the git-ignored fp32 MobileNetV2 if missing; exits with a clear message when torch is absent."""
    if FP32.exists():
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            f"error: {FP32.relative_to(ROOT)} is missing and torch is not installed to build it\n"
            "hint: pip install -e '.[models]' && python tools/make_models.py --mobilenet-fp32"
        )
    print(f"building {FP32.relative_to(ROOT)} (needs torch, ~30 s) ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_models.py"), "--mobilenet-fp32"], check=True)


def interleaved_latency(
    a: ort.InferenceSession, b: ort.InferenceSession, x: np.ndarray, rounds: int
) -> tuple[list[float], list[float]]:
    """Per-run seconds for a and b, alternating which goes first each round so drift hits both equally."""
    feeds = {"input": x}
    for _ in range(WARMUP):
        a.run(None, feeds)
        b.run(None, feeds)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for sess, times in order:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    return ta, tb


def cosines(a: ort.InferenceSession, b: ort.InferenceSession) -> tuple[list[float], int]:
    """Logits cosine per seeded N(0,1) image, and how many top-1 classes agree."""
    rng = np.random.default_rng(INPUT_SEED)
    out, agree = [], 0
    for _ in range(COSINE_INPUTS):
        x = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
        la = np.asarray(a.run(["logits"], {"input": x})[0]).ravel().astype(np.float64)
        lb = np.asarray(b.run(["logits"], {"input": x})[0]).ravel().astype(np.float64)
        out.append(float(la @ lb / (np.linalg.norm(la) * np.linalg.norm(lb))))
        agree += int(la.argmax() == lb.argmax())
    return out, agree


def digits_accuracy(name: str, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy in percent of a committed digits model (ONNX via onnxruntime, .tflite via LiteRT)."""
    blob = (MODELS / name).read_bytes()
    if name.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_content=blob)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        it.resize_tensor_input(inp["index"], list(x.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], x)
        it.invoke()
        logits = it.get_tensor(out["index"])
    else:
        logits = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(
            ["logits"], {"pixels": x}
        )[0]
    return 100.0 * float((np.asarray(logits).argmax(1) == y).mean())


def verdict(ok: bool) -> str:
    """PASS/MISS marker for a target."""
    return "PASS" if ok else "MISS"


def main() -> int:
    """Run the benchmark and print the table; exit 1 if a target is missed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None, help="also write a summary to this file")
    args = ap.parse_args()
    ensure_fp32()
    fp32, int8 = session(FP32, args.threads), session(INT8, args.threads)
    x = np.random.default_rng(INPUT_SEED).standard_normal((1, 3, 224, 224), dtype=np.float32)
    t32, t8 = interleaved_latency(fp32, int8, x, args.rounds)
    p50_32, p50_8 = statistics.median(t32), statistics.median(t8)
    speedup = p50_32 / p50_8
    cos, agree = cosines(fp32, int8)
    print(
        f"MobileNetV2 224x224, batch 1, {args.threads} intra-op threads, {args.rounds} interleaved rounds, "
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        "(other work on the machine skews the ratio)"
    )
    print(f"{'variant':8} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for label, ts in (("fp32", t32), ("int8", t8)):
        q = statistics.quantiles(ts, n=10)
        print(
            f"{label:8} {1e3 * statistics.median(ts):8.2f} {1e3 * q[8]:8.2f} "
            f"{1e3 * statistics.fmean(ts):8.2f}"
        )
    print(
        f"speed-up fp32/int8 (p50): {speedup:.2f}x   target >= {TARGET_SPEEDUP}x  "
        f"{verdict(speedup >= TARGET_SPEEDUP)}"
    )
    print(
        f"logits cosine int8 vs fp32 over {len(cos)} seeded N(0,1) images: min {min(cos):.5f} mean "
        f"{statistics.fmean(cos):.5f}; top-1 agree {agree}/{len(cos)}   target >= {TARGET_COSINE}  "
        f"{verdict(min(cos) >= TARGET_COSINE)}"
    )
    with np.load(MODELS / "digits_test.npz", allow_pickle=False) as npz:
        dx, dy = npz["x"], npz["y"]
    print(
        f"\ndigits held-out accuracy ({len(dy)} images)\n{'model':14} {'fp32 onnx':>10} {'int8 onnx':>10} "
        f"{'int8 tflite':>12} {'max drop pt':>12}"
    )
    ok = speedup >= TARGET_SPEEDUP and min(cos) >= TARGET_COSINE
    summary: dict = {
        "threads": args.threads,
        "rounds": args.rounds,
        "load": os.getloadavg()[0],
        "fp32_p50_ms": 1e3 * p50_32,
        "int8_p50_ms": 1e3 * p50_8,
        "speedup": speedup,
        "cosine_min": min(cos),
        "top1_agree": f"{agree}/{len(cos)}",
        "digits_drop_pt": {},
    }
    for fam in ("digits_small", "digits_large"):
        a32 = digits_accuracy(f"{fam}_fp32.onnx", dx, dy)
        a8 = digits_accuracy(f"{fam}_int8.onnx", dx, dy)
        atf = digits_accuracy(f"{fam}_int8.tflite", dx, dy)
        drop = max(a32 - a8, a32 - atf)
        ok &= drop <= MAX_DIGITS_DROP_PT
        summary["digits_drop_pt"][fam] = drop
        print(
            f"{fam:14} {a32:10.2f} {a8:10.2f} {atf:12.2f} {drop:12.2f}  {verdict(drop <= MAX_DIGITS_DROP_PT)}"
        )
    if args.json:
        from bench_serving import write_json

        write_json(args.json, summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
