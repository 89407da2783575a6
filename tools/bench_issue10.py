"""Every issue-10 row against its target in one run: the benchmark scripts back to back, one table.

Each script measures its own comparison side by side (interleaved, medians) and writes a JSON summary
(``--json``); this driver runs them one after the other on the same machine in the same session, so the
whole table comes from one run, and prints it as Markdown for BENCHMARKS.md together with the load average
seen during each part. Nothing here is a test: a missed target is reported, not asserted.

    cd tools && python bench_issue10.py [--quick] [--out DIR]

Parts (each also runnable on its own with the flags shown in the table's "command" column):
bench_serving (digits socket/HTTP added latency, throughput, binary MobileNetV2, cold start, MobileNetV2
over JSON with memory coming back), bench_int8, bench_batching, bench_clients, bench_security and
bench_demo_rss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Part:
    """One benchmark script run with ``--json``."""

    name: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]


PARTS = (
    Part("serving", ("bench_serving.py",), ("bench_serving.py", "--quick")),
    Part("int8", ("bench_int8.py", "--threads", "2", "--rounds", "200"), ("bench_int8.py", "--rounds", "80")),
    Part(
        "batching",
        ("bench_batching.py", "--rounds", "5", "--seconds", "3"),
        ("bench_batching.py", "--rounds", "3", "--seconds", "2"),
    ),
    Part(
        "clients",
        ("bench_clients.py", "--rounds", "6", "--seconds", "3", "--linger", "250"),
        ("bench_clients.py", "--rounds", "4", "--seconds", "2", "--linger", "250"),
    ),
    Part(
        "security",
        ("bench_security.py", "--rounds", "41", "--big-mb", "20"),
        ("bench_security.py", "--rounds", "21", "--big-mb", "5"),
    ),
    Part("demo_rss", ("bench_demo_rss.py", "--rounds", "3"), ("bench_demo_rss.py", "--rounds", "1")),
)


@dataclass(frozen=True)
class Row:
    """One table row: what, target, how to read the value from the parts' summaries, and the check."""

    what: str
    target: str
    part: str
    value: Callable[[dict[str, Any]], Any]
    met: Callable[[Any], bool]
    fmt: Callable[[Any], str]


def _get(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        d = d[key]
    return d


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _batching(transport: str, model: str) -> Callable[[dict[str, Any]], Any]:
    return lambda s: s["cells"][f"{transport}/{model}/on"]["on_off"]


def _ratio_range(v: dict[str, float]) -> str:
    return f"{v['median']:.2f}x (rounds {v['min']:.2f}-{v['max']:.2f})"


def _security(model: str, key: str = "ratios") -> Callable[[dict[str, Any]], Any]:
    """``ratios``: a repeated load of the same version; ``first_ratios``: the package's first load."""
    return lambda s: s[key][model]


ROWS = (
    Row(
        "MobileNetV2 int8 over OIP JSON (1.6 MB), p50 at one client / bare onnxruntime p50",
        "≤ 2.5x (aim 2x)",
        "serving",
        lambda s: _get(s, "mobilenet_json.one_client.edgert.ratio_to_bare"),
        lambda v: v <= 2.5,
        _x,
    ),
    Row(
        "same, server CPU per request / bare CPU per request",
        "≤ 2.5x",
        "serving",
        lambda s: _get(s, "mobilenet_json.one_client.edgert.cpu_ratio_to_bare"),
        lambda v: v <= 2.5,
        _x,
    ),
    Row(
        "decoding that request in process: edgert's codec (simdjson into numpy) against orjson + numpy",
        "faster than the peers' way",
        "serving",
        lambda s: _get(s, "mobilenet_json.codec_in_process.ms"),
        lambda v: v["decode_speedup_vs_orjson"] > 1,
        lambda v: f"{v['decode_edgert']} vs {v['decode_orjson_then_numpy']} ms",
    ),
    Row(
        "encoding a 1x3x224x224 FP32 output as JSON: edgert (orjson from numpy, float32 reprs) against "
        "orjson / json of `tolist()`",
        "faster than the peers' way",
        "serving",
        lambda s: _get(s, "mobilenet_json.codec_in_process.ms"),
        lambda v: v["encode_speedup_vs_orjson_tolist"] > 1,
        lambda v: f"{v['encode_edgert']} vs {v['encode_orjson_tolist']} / {v['encode_json_tolist']} ms",
    ),
    Row(
        "same, 32 clients: peak RSS per in-flight request / request size",
        "≤ ~2x",
        "serving",
        lambda s: _get(s, "mobilenet_json.load_edgert.peak_per_inflight_x_request"),
        lambda v: v <= 2.0,
        _x,
    ),
    Row(
        "same, after the 32-client burst: seconds until RSS is within 15% of idle",
        "within seconds",
        "serving",
        lambda s: _get(s, "mobilenet_json.load_edgert"),
        lambda v: v["s_to_within_15pct_of_idle"] is not None and v["s_to_within_15pct_of_idle"] <= 5,
        lambda v: (
            f"{v['s_to_within_15pct_of_idle']} s (idle {v['rss_idle_mb']} MB, peak {v['rss_peak_mb']}, "
            f"10 s later {v['rss_after_10s_mb']})"
        ),
    ),
    Row(
        "dynamic batching on / off, 32 clients in 2 processes, Unix socket, digits small",
        "≥ 3x",
        "batching",
        _batching("uds", "small"),
        lambda v: v["median"] >= 3,
        _ratio_range,
    ),
    Row(
        "same, digits large",
        "≥ 3x",
        "batching",
        _batching("uds", "large"),
        lambda v: v["median"] >= 3,
        _ratio_range,
    ),
    Row(
        "same over HTTP JSON, digits small",
        "≥ 3x",
        "batching",
        _batching("http", "small"),
        lambda v: v["median"] >= 3,
        _ratio_range,
    ),
    Row(
        "same over HTTP JSON, digits large",
        "≥ 3x",
        "batching",
        _batching("http", "large"),
        lambda v: v["median"] >= 3,
        _ratio_range,
    ),
    Row(
        "Unix socket round trip added over in-process, digits, p50 (interleaved)",
        "≤ 60 µs",
        "serving",
        lambda s: _get(s, "digits_added_p50_us.uds"),
        lambda v: v <= 60,
        lambda v: f"{v:.0f} µs",
    ),
    Row(
        "`edgert demo` RSS after 200 mixed requests (digits small, large, cascade, tones; HTTP + socket)",
        "≤ 80 MB",
        "demo_rss",
        lambda s: s,
        lambda v: v["rss_after_mb"] <= 80,
        lambda v: f"{v['rss_after_mb']:.1f} MB (at ready {v['rss_ready_mb']:.1f})",
    ),
    Row(
        "int8 / fp32 MobileNetV2 speed, 2 intra-op threads, p50 (interleaved)",
        "≥ 2x",
        "int8",
        lambda s: s["speedup"],
        lambda v: v >= 2.0,
        _x,
    ),
    Row(
        "int8 logits cosine against fp32 (min over 16 images)",
        "≥ 0.99",
        "int8",
        lambda s: s["cosine_min"],
        lambda v: v >= 0.99,
        lambda v: f"{v:.5f}",
    ),
    *(
        Row(
            f"encrypted / plaintext load, {model}, {label}",
            "≤ 1.1x",
            "security",
            _security(model, key),
            lambda v: v <= 1.1,
            _x,
        )
        for model in (
            "digits_small_int8.onnx",
            "digits_large_int8.onnx",
            "digits_small_int8.tflite",
            "mobilenetv2_int8.onnx",
        )
        for key, label in (
            ("first_ratios", "first load of the package (daemon start)"),
            ("ratios", "repeated load of the version (reload, cold load under the memory budget)"),
        )
    ),
    Row(
        "HTTP JSON throughput, digits, 32 clients / 16 clients (per round)",
        "≥ 1",
        "clients",
        lambda s: s["cells"]["linger250/procs2/clients32"]["ratio_to_fewer_clients"],
        lambda v: v["median"] >= 1.0,
        _ratio_range,
    ),
    Row(
        "other §5 rows in the same run: HTTP JSON added over in-process, digits, p50",
        "≤ 150 µs",
        "serving",
        lambda s: _get(s, "digits_added_p50_us.http_json"),
        lambda v: v <= 150,
        lambda v: f"{v:.0f} µs",
    ),
    Row(
        "HTTP JSON throughput, digits, 32 clients",
        "≥ 7,000 req/s",
        "serving",
        lambda s: _get(s, "http_json_32_clients.req_per_s"),
        lambda v: v >= 7000,
        lambda v: f"{v:,.0f} req/s",
    ),
    Row(
        "MobileNetV2 over HTTP with the binary tensor extension / bare p50",
        "≤ 1.3x",
        "serving",
        lambda s: _get(s, "mobilenet_p50_ms.ratio"),
        lambda v: v <= 1.3,
        _x,
    ),
    Row(
        "cold start to READY=1, 3 encrypted models",
        "≤ 1.0 s",
        "serving",
        lambda s: s["cold_start_3_encrypted_s"],
        lambda v: v <= 1.0,
        lambda v: f"{v:.2f} s",
    ),
)


def run_parts(out: Path, quick: bool, only: set[str] | None) -> dict[str, dict[str, Any]]:
    """Run each part's script with ``--json``; a part that fails is reported, the others still run."""
    results: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        if only and part.name not in only:
            continue
        args = part.quick_args if quick else part.args
        path = out / f"{part.name}.json"
        load0, t0 = os.getloadavg()[0], time.monotonic()
        cmd = [sys.executable, *args, "--json", str(path)]
        print(f"[{part.name}] {' '.join(args)}", flush=True)
        proc = subprocess.run(cmd, cwd=TOOLS, capture_output=True, text=True)
        (out / f"{part.name}.log").write_text(proc.stdout + proc.stderr)
        if not path.exists():
            results[part.name] = {"error": f"exit {proc.returncode}; see {out / part.name}.log"}
            print(f"[{part.name}] FAILED: {proc.stderr[-600:]}", flush=True)
            continue
        summary = json.loads(path.read_text())
        summary["_command"] = " ".join(args)
        summary["_load"] = [load0, os.getloadavg()[0]]
        summary["_seconds"] = time.monotonic() - t0
        results[part.name] = summary
        print(f"[{part.name}] done in {summary['_seconds']:.0f} s", flush=True)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    """The Markdown table: one line per row, with the part's command and load average."""
    lines = ["| row | result | target | met | command (in tools/) |", "|---|---|---|---|---|"]
    for row in ROWS:
        part = results.get(row.part)
        if part is None:
            continue
        if "error" in part:
            lines.append(f"| {row.what} | not measured: {part['error']} | {row.target} | ? | |")
            continue
        try:
            value = row.value(part)
            shown, ok = row.fmt(value), row.met(value)
        except (KeyError, TypeError) as exc:
            lines.append(
                f"| {row.what} | not in the summary ({exc}) | {row.target} | ? | `{part['_command']}` |"
            )
            continue
        load = "-".join(f"{v:.1f}" for v in part["_load"])
        mark = "✓" if ok else "✗"
        lines.append(f"| {row.what} | {shown} | {row.target} | {mark} | `{part['_command']}` (load {load}) |")
    return "\n".join(lines)


def main() -> int:
    """Run the parts, print the table, keep the summaries."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes); for a smoke run")
    ap.add_argument("--out", type=Path, default=None, help="keep each part's JSON and log here")
    ap.add_argument("--only", default="", help="comma-separated part names (default: all)")
    args = ap.parse_args()
    only = {p for p in args.only.split(",") if p} or None
    with tempfile.TemporaryDirectory() as d:
        out = args.out or Path(d)
        out.mkdir(parents=True, exist_ok=True)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results = run_parts(out, args.quick, only)
        (out / "issue10.json").write_text(json.dumps(results, indent=2) + "\n")
    flags = " --quick" if args.quick else ""
    print(f"\nRun of {started}, {os.cpu_count()} CPUs, `python bench_issue10.py{flags}`\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
