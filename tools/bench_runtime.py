#!/usr/bin/env python3
"""In-process overhead of ``Model.infer`` against bare ``onnxruntime.InferenceSession.run``.

Both run the same model bytes with the same session options, interleaved in blocks within one
run so that machine noise hits both alike. Prints per-call p50/p99 for each and the ratio of
medians (DESIGN §5 target: <= 1.2x on digits, <= 1.02x on MobileNetV2).

    python tools/bench_runtime.py                 # digits int8 + MobileNetV2 int8 (+ fp32 if generated)
    python tools/bench_runtime.py --json --rounds 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgert import Runtime  # noqa: E402
from edgert.backends.onnx import _session_options  # noqa: E402

CASES = [
    ("digits small int8", REPO / "models/digits_small_int8.onnx", "pixels", (1, 64), 1.2),
    ("digits large int8", REPO / "models/digits_large_int8.onnx", "pixels", (1, 64), 1.2),
    ("MobileNetV2 int8", REPO / "models/mobilenetv2_int8.onnx", "input", (1, 3, 224, 224), 1.02),
    ("MobileNetV2 fp32", REPO / "models/generated/mobilenetv2_fp32.onnx", "input", (1, 3, 224, 224), 1.02),
]


def _block(fn, n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def bench_case(path: Path, input_name: str, shape: tuple[int, ...], rounds: int, threads: int) -> dict:
    data = path.read_bytes()
    bare = ort.InferenceSession(
        data, sess_options=_session_options(threads), providers=["CPUExecutionProvider"]
    )
    model = Runtime("cpu-generic").load(data, name=path.stem, options=None)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {input_name: x}
    # check both give the same answer before timing anything
    np.testing.assert_allclose(model.infer(feed)["logits"], bare.run(None, feed)[0], rtol=1e-5, atol=1e-5)
    t_one = min(_block(lambda: bare.run(None, feed), 20))
    per_block = max(5, min(2000, int(0.05 / max(t_one, 1e-6))))
    bare_t: list[float] = []
    rt_t: list[float] = []
    for r in range(rounds):
        # alternate which goes first so neither always gets the warmer cache
        if r % 2 == 0:
            bare_t += _block(lambda: bare.run(None, feed), per_block)
            rt_t += _block(lambda: model.infer(feed), per_block)
        else:
            rt_t += _block(lambda: model.infer(feed), per_block)
            bare_t += _block(lambda: bare.run(None, feed), per_block)
    b = np.asarray(bare_t)
    e = np.asarray(rt_t)
    return {
        "calls_each": int(b.size),
        "bare_p50_us": float(np.median(b) * 1e6),
        "bare_p99_us": float(np.percentile(b, 99) * 1e6),
        "edgert_p50_us": float(np.median(e) * 1e6),
        "edgert_p99_us": float(np.percentile(e, 99) * 1e6),
        "added_p50_us": float((np.median(e) - np.median(b)) * 1e6),
        "ratio_p50": float(np.median(e) / np.median(b)),
        "provider": model.provider,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved blocks per side")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for both sides")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    for label, path, name, shape, target in CASES:
        if not path.exists():
            print(
                f"# skipped {label}: {path.relative_to(REPO)} not found "
                "(python tools/make_models.py --mobilenet-fp32 builds it)",
                file=sys.stderr,
            )
            continue
        res = bench_case(path, name, shape, args.rounds, args.threads)
        res.update({"case": label, "target_ratio": target, "meets_target": res["ratio_p50"] <= target})
        results.append(res)
        if not args.json:
            print(
                f"{label:<20} bare p50 {res['bare_p50_us']:9.1f} us  "
                f"edgert p50 {res['edgert_p50_us']:9.1f} us  "
                f"added {res['added_p50_us']:6.1f} us  ratio {res['ratio_p50']:.3f}x (target <= {target}x) "
                f"{'OK' if res['meets_target'] else 'MISS'}  [{res['calls_each']} calls each]",
                flush=True,
            )
    if args.json:
        print(json.dumps({"threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
