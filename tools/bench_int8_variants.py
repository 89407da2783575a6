"""Which int8 MobileNetV2 build and session settings are fastest against fp32, side by side in one run.

    python tools/bench_int8_variants.py [--threads 2] [--rounds 12] [--block 15] [--only a,b] [--profile]

Builds each quantization variant of the git-ignored fp32 MobileNetV2 (``make_models.py --mobilenet-fp32``)
into models/generated/int8_variants/ (cached; same 64 seeded calibration images as the committed model),
then times every (model, session settings) pair in interleaved blocks: each round runs ``--block`` calls of
every pair in a rotated order, and the reported figure is the median over rounds of each block's median.
fp32 is timed with the same settings as each int8 pair, so every ratio is like for like. ``--profile``
writes onnxruntime's profile for the committed int8 and fp32 and prints time per op type.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelkit.common import MOBILENET_CALIB, SEED
from modelkit.convert import _Reader
from modelkit.mobilenet import mobilenet_inputs

ROOT = Path(__file__).resolve().parents[1]
FP32 = ROOT / "models" / "generated" / "mobilenetv2_fp32.onnx"
INT8 = ROOT / "models" / "mobilenetv2_int8.onnx"
VARIANTS_DIR = ROOT / "models" / "generated" / "int8_variants"
INPUT_SEED = 1234  # as bench_int8.py: not the calibration seed
COSINE_INPUTS = 16
WARMUP = 5


@dataclass(frozen=True)
class Quant:
    """One quantize_static configuration."""

    fmt: str = "QDQ"  # or "QOperator"
    per_channel: bool = True
    reduce_range: bool = False
    act: str = "U8"  # or "S8" (symmetric activations)
    exclude_ends: bool = False  # keep the first conv and the classifier in fp32
    extra: dict[str, Any] = field(default_factory=dict)


QUANTS: dict[str, Quant] = {
    "qdq_pc": Quant(),  # what make_models.py builds today (rebuilt here with this machine's torch)
    "qdq_pt": Quant(per_channel=False),
    "qdq_pc_rr": Quant(reduce_range=True),
    "qdq_pt_rr": Quant(per_channel=False, reduce_range=True),
    "qdq_s8_pc": Quant(act="S8"),
    "qdq_pc_ends": Quant(exclude_ends=True),
    "qop_pc": Quant(fmt="QOperator"),
    "qop_pt": Quant(fmt="QOperator", per_channel=False),
}


def build_variant(name: str, q: Quant) -> Path:
    """quantize_static of the fp32 model with q; cached by name."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = VARIANTS_DIR / f"{name}.onnx"
    if out.exists():
        return out
    VARIANTS_DIR.mkdir(parents=True, exist_ok=True)
    pre = VARIANTS_DIR / "pre.onnx"
    if not pre.exists():
        quant_pre_process(str(FP32), str(pre))
    exclude: list[str] = []
    if q.exclude_ends:
        import onnx

        nodes = onnx.load(str(pre)).graph.node
        exclude = [
            next(n.name for n in nodes if n.op_type == "Conv"),
            next(n.name for n in nodes if n.op_type == "Gemm"),
        ]
    extra = {"ActivationSymmetric": q.act == "S8", "WeightSymmetric": True, **q.extra}
    t0 = time.perf_counter()
    quantize_static(
        str(pre),
        str(out),
        _Reader("input", mobilenet_inputs(MOBILENET_CALIB, SEED)),
        quant_format=QuantFormat.QDQ if q.fmt == "QDQ" else QuantFormat.QOperator,
        per_channel=q.per_channel,
        reduce_range=q.reduce_range,
        activation_type=QuantType.QInt8 if q.act == "S8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude,
        extra_options=extra,
    )
    print(f"built {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


SETTINGS: dict[str, dict[str, Any]] = {
    "all": {},
    "ext": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
    "nospin": {"config": {"session.intra_op.allow_spinning": "0"}},
    "pin": {"config": {"session.intra_op_thread_affinities": "2"}, "pin_main": 0},
    "offline": {"offline": True},
}


def merged(setting: str) -> dict[str, Any]:
    """The SETTINGS entries named in ``setting`` ('+'-separated), merged."""
    out: dict[str, Any] = {"config": {}}
    for part in setting.split("+"):
        s = SETTINGS[part]
        out.update({k: v for k, v in s.items() if k != "config"})
        out["config"].update(s.get("config", {}))
    return out


def session(path: Path, threads: int, setting: str, profile: str | None = None) -> ort.InferenceSession:
    """A CPU session as bench_int8.py makes it, plus SETTINGS entries joined by '+' (e.g. ``nospin+pin``)."""
    s = merged(setting)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = s.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for k, v in s.get("config", {}).items():
        if k == "session.intra_op_thread_affinities" and threads < 2:
            continue
        opts.add_session_config_entry(k, v)
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    if s.get("offline"):
        opt_path = VARIANTS_DIR / f"{path.stem}.opt{threads}.onnx"
        if not opt_path.exists():
            VARIANTS_DIR.mkdir(parents=True, exist_ok=True)
            o = ort.SessionOptions()
            o.intra_op_num_threads = threads
            o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            o.optimized_model_filepath = str(opt_path)
            ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        path = opt_path
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosine_check(a: ort.InferenceSession, b: ort.InferenceSession) -> tuple[float, int]:
    """Min logits cosine and top-1 agreement over seeded images (as bench_int8.py)."""
    rng = np.random.default_rng(INPUT_SEED)
    worst, agree = 1.0, 0
    for _ in range(COSINE_INPUTS):
        x = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
        la = np.asarray(a.run(None, {"input": x})[0]).ravel().astype(np.float64)
        lb = np.asarray(b.run(None, {"input": x})[0]).ravel().astype(np.float64)
        worst = min(worst, float(la @ lb / (np.linalg.norm(la) * np.linalg.norm(lb))))
        agree += int(la.argmax() == lb.argmax())
    return worst, agree


def _profile(path: Path, threads: int, runs: int) -> tuple[list[dict[str, Any]], float]:
    """Kernel events of ``runs`` profiled runs after warm-up, and the wall time per run."""
    sess = session(path, threads, "all", profile=f"/tmp/ort_prof_{os.getpid()}_{path.stem}")
    x = np.random.default_rng(INPUT_SEED).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for _ in range(WARMUP):
        sess.run(None, {"input": x})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {"input": x})
    wall = (time.perf_counter() - t0) / runs
    prof = Path(sess.end_profiling())
    events = [
        e
        for e in json.loads(prof.read_text())
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    ]
    prof.unlink()
    return events[-len(events) * runs // (runs + WARMUP) :], wall


def profile(threads: int, runs: int = 40) -> None:
    """Print mean µs per run by op type, and for the 52 convolutions by kind, fp32 against int8.

    The k-th convolution run is the same layer in both models (same graph, same topological order);
    its kind comes from the fp32 weight shape, since int8 weights are pre-packed and not shown.
    """
    ev32, wall32 = _profile(FP32, threads, runs)
    ev8, wall8 = _profile(INT8, threads, runs)
    kinds: list[str] = []
    for e in ev32:
        if e["args"]["op_name"] == "Conv" and len(kinds) < 52:
            w = e["args"]["input_type_shape"][1]["float"]
            kinds.append(
                "depthwise 3x3" if w[1] == 1 and w[2] == 3 else "pointwise 1x1" if w[2] == 1 else "stem 3x3"
            )
    for label, ev, wall in (("fp32", ev32, wall32), ("int8", ev8, wall8)):
        per: collections.Counter[str] = collections.Counter()
        i = 0
        for e in ev:
            op = e["args"]["op_name"]
            if op in ("Conv", "QLinearConv"):
                per[f"{op} {kinds[i % len(kinds)]}"] += e["dur"]
                i += 1
            else:
                per[op] += e["dur"]
        print(
            f"\n{label}: mean µs per run ({threads} threads, {runs} runs, load {os.getloadavg()[0]:.2f}); "
            f"wall per run {1e6 * wall:.0f} µs (profiling on)"
        )
        for k, v in per.most_common():
            print(f"  {k:34} {v / runs:9.1f}  {100 * v / sum(per.values()):5.1f} %")


def p10(xs: list[float]) -> float:
    """10th percentile."""
    return statistics.quantiles(xs, n=10)[0]


def main() -> int:
    """Build variants, time them interleaved, print one row per pair."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=15)
    ap.add_argument(
        "--only", default="", help="comma-separated model:setting pairs (default: a standard set)"
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="time each call by the calling thread's CPU time (forces --threads 1, where onnxruntime runs "
        "in the caller): robust to other load on a shared machine, unlike wall time",
    )
    args = ap.parse_args()
    if args.cpu:
        args.threads = 1
    clock = time.thread_time if args.cpu else time.perf_counter
    if not FP32.exists():
        sys.exit(
            "error: models/generated/mobilenetv2_fp32.onnx is missing\n"
            "hint: python tools/make_models.py --mobilenet-fp32"
        )
    if args.profile:
        profile(args.threads)
        return 0
    models: dict[str, Path] = {"fp32": FP32, "committed": INT8}
    pairs = (
        [tuple(p.split(":")) for p in args.only.split(",")]
        if args.only
        else [("fp32", "all"), ("committed", "all")] + [(q, "all") for q in QUANTS]
    )
    for m, _ in pairs:
        if m not in models:
            models[m] = build_variant(m, QUANTS[m])
    # fp32 under each setting used, so each int8 row has a like-for-like denominator
    for s in {s for _, s in pairs}:
        if ("fp32", s) not in pairs:
            pairs.append(("fp32", s))
    sess = {p: session(models[p[0]], args.threads, p[1]) for p in pairs}
    ref = sess[("fp32", "all")] if ("fp32", "all") in sess else session(FP32, args.threads, "all")
    x = np.random.default_rng(INPUT_SEED).standard_normal((1, 3, 224, 224), dtype=np.float32)
    feeds = {"input": x}
    for s in sess.values():
        for _ in range(WARMUP):
            s.run(None, feeds)
    blocks: dict[tuple[str, ...], list[float]] = {p: [] for p in pairs}
    calls: dict[tuple[str, ...], list[float]] = {p: [] for p in pairs}
    loads = [os.getloadavg()[0]]
    t_start = time.time()
    for r in range(args.rounds):
        order = pairs[r % len(pairs) :] + pairs[: r % len(pairs)]
        for p in order:
            pin = merged(p[1]).get("pin_main")
            if pin is not None:
                os.sched_setaffinity(0, {pin})
            ts = []
            for _ in range(args.block):
                t0 = clock()
                sess[p].run(None, feeds)
                ts.append(clock() - t0)
            if pin is not None:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            blocks[p].append(statistics.median(ts))
            calls[p] += ts
        loads.append(os.getloadavg()[0])
    print(
        f"\nMobileNetV2 int8 variants, batch 1, {args.threads} threads, "
        f"{'thread CPU' if args.cpu else 'wall'} time, {args.rounds} rounds x {args.block} calls, "
        f"{time.time() - t_start:.0f} s, load average {min(loads):.2f}-{max(loads):.2f}, "
        f"onnxruntime {ort.__version__}"
    )
    print(
        "p50 = median over rounds of each block's median; "
        "min/p10 = over all calls (least disturbed by other load)"
    )
    print(
        f"{'model':14} {'setting':8} {'p50 ms':>8} {'vs fp32 same':>13} {'vs fp32 all':>12} "
        f"{'rounds min-max ratio':>21} {'min ms':>7} {'ratio':>6} {'p10 ratio':>9} {'cos min':>8} top1"
    )
    base_all = statistics.median(blocks[("fp32", "all")]) if ("fp32", "all") in blocks else float("nan")
    for p in pairs:
        med = statistics.median(blocks[p])
        f = blocks[("fp32", p[1])]
        per_round = [a / b for a, b in zip(f, blocks[p], strict=True)]
        cos, agree = ("", "") if p[0] == "fp32" else cosine_check(ref, sess[p])
        print(
            f"{p[0]:14} {p[1]:8} {1e3 * med:8.2f} {statistics.median(f) / med:12.2f}x "
            f"{base_all / med:11.2f}x "
            f"{min(per_round):9.2f}-{max(per_round):.2f}x "
            f"{1e3 * min(calls[p]):7.2f} {min(calls[('fp32', p[1])]) / min(calls[p]):5.2f}x "
            f"{p10(calls[('fp32', p[1])]) / p10(calls[p]):8.2f}x "
            + (f"{cos:8.5f} {agree}/{COSINE_INPUTS}" if cos != "" else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
