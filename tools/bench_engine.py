"""Engine benchmarks, measured side by side in one run (ratios, not absolute targets).

    python tools/bench_engine.py [--seconds 2] [--rounds 3]

1. Dynamic batching: 32 concurrent in-process clients on the digits models, batching on vs off,
   interleaved round by round so machine noise hits both alike.
2. Cascade on models/digits_test.npz: accuracy and mean compute (FLOPs from models/cards.json, and
   measured time) against the large model alone, plus the threshold sweep behind the default.
3. Hot swap: p99 latency of requests completing during a swap vs steady state, under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgert import ModelOptions, Runtime
from edgert.engine import DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD, Engine, ModelConfig
from edgert.engine.cascade import choose_threshold, evaluate
from edgert.metrics import Metrics

MODELS = Path(__file__).resolve().parents[1] / "models"
CLIENTS = 32
#: One full batch per round of clients.
BATCH = 32


async def _throughput(engine: Engine, name: str, x: np.ndarray, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    done = 0

    async def client(i: int) -> None:
        nonlocal done
        j = i
        while time.perf_counter() < stop:
            await engine.infer(name, {"pixels": x[j % len(x)][None]})
            done += 1
            j += CLIENTS
            await asyncio.sleep(0)  # one request per turn, like independent network clients

    start = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(CLIENTS)])
    return done / (time.perf_counter() - start)


def _ceiling(model, x: np.ndarray, reps: int = 30) -> float:
    """Best possible batching gain for ``model``: time per row alone / time per row in a full batch.

    Bare ``run`` calls, interleaved: no engine, no event loop. When this is below the target, no
    batcher can reach it on this machine, because the session itself does not get cheaper per row.
    """
    one, full = x[:1], x[:BATCH]
    t1, tb = [], []
    for _ in range(reps):
        start = time.perf_counter()
        model.run({"pixels": one})
        t1.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.run({"pixels": full})
        tb.append(time.perf_counter() - start)
    return statistics.median(t1) / (statistics.median(tb) / BATCH)


def bench_batching(rt: Runtime, x: np.ndarray, seconds: float, rounds: int) -> None:
    print(f"== dynamic batching: {CLIENTS} concurrent in-process clients, req/s (median of {rounds} rounds)")
    print("   on/1t = batching with one intra-op thread (leaves the second core to the event loop)")
    for family in ("digits_small_fp32", "digits_small_int8", "digits_large_fp32", "digits_large_int8"):
        engine = Engine(Metrics())
        engine.add_model(rt.load(MODELS / f"{family}.onnx"), ModelConfig("off"))
        engine.add_model(
            rt.load(MODELS / f"{family}.onnx"),
            ModelConfig("on", max_batch_size=BATCH, max_queue_delay_us=500),
        )
        engine.add_model(
            rt.load(MODELS / f"{family}.onnx", options=ModelOptions(threads=1)),
            ModelConfig("on1", max_batch_size=BATCH, max_queue_delay_us=500),
        )
        ceiling = _ceiling(rt.load(MODELS / f"{family}.onnx"), x)
        res: dict[str, list[float]] = {"off": [], "on": [], "on1": []}
        for _ in range(rounds):
            for name, runs in res.items():
                runs.append(asyncio.run(_throughput(engine, name, x, seconds)))
        off, on, on1 = (statistics.median(res[k]) for k in ("off", "on", "on1"))
        mean_batch = engine.metrics.stats_copy("on")["mean_batch_size"]
        placement = "inline" if engine._served["off"].inline else "thread pool"
        print(
            f"{family:18s} off ({placement}) {off:7.0f}  on {on:7.0f} ({on / off:4.2f}x)  "
            f"on/1t {on1:7.0f} ({on1 / off:4.2f}x)  mean batch {mean_batch:4.1f}  "
            f"session ceiling {ceiling:4.2f}x"
        )
        engine.close()


def _timed_run(model, x: np.ndarray, reps: int = 20) -> tuple[np.ndarray, float]:
    out = model.run({"pixels": x})["logits"]
    start = time.perf_counter()
    for _ in range(reps):
        model.run({"pixels": x})
    return out, (time.perf_counter() - start) / reps / len(x)


def bench_cascade(rt: Runtime, x: np.ndarray, y: np.ndarray) -> None:
    print(
        "== cascade on digits_test.npz (small -> large), default "
        f"{DIGITS_DEFAULT_RULE} < {DIGITS_DEFAULT_THRESHOLD}"
    )
    cards = json.loads((MODELS / "cards.json").read_text())["models"]
    opts = ModelOptions(max_batch=len(x))
    for prec in ("fp32", "int8"):
        small = rt.load(MODELS / f"digits_small_{prec}.onnx", options=opts)
        large = rt.load(MODELS / f"digits_large_{prec}.onnx", options=opts)
        s_logits, s_time = _timed_run(small, x)
        l_logits, l_time = _timed_run(large, x)
        s_flops = cards[f"digits_small_{prec}.onnx"]["flops_per_sample"]
        l_flops = cards[f"digits_large_{prec}.onnx"]["flops_per_sample"]
        d = evaluate(s_logits, l_logits, y, DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD, s_flops, l_flops)
        by_time = (s_time + d.escalation_rate * l_time) / l_time
        print(
            f"{prec}: large {d.large_accuracy * 100:.2f}%  small {d.small_accuracy * 100:.2f}%  cascade "
            f"{d.accuracy * 100:.2f}% (delta {100 * (d.accuracy - d.large_accuracy):+.2f} pt)  escalated "
            f"{d.escalation_rate * 100:.1f}%  compute vs large: FLOPs {d.relative_compute:.3f}, "
            f"measured time {by_time:.3f}"
        )
        for rule in ("max_softmax", "margin"):
            c = choose_threshold(s_logits, l_logits, y, small_cost=s_flops, large_cost=l_flops, rules=(rule,))
            print(
                f"   cheapest {rule} within 0.3 pt: threshold {c.threshold}  acc {c.accuracy * 100:.2f}%  "
                f"compute {c.relative_compute:.3f}"
            )


async def _swap_run(engine: Engine, rt: Runtime, x: np.ndarray, seconds: float) -> tuple[list, list, int]:
    steady: list[float] = []
    during: list[float] = []
    failures = 0
    phase = {"swap": False}
    stop = asyncio.Event()

    async def client(i: int) -> None:
        nonlocal failures
        j = i
        while not stop.is_set():
            t = time.perf_counter()
            try:
                await engine.infer("d", {"pixels": x[j % len(x)][None]})
            except Exception:
                failures += 1
            (during if phase["swap"] else steady).append(time.perf_counter() - t)
            j += CLIENTS
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(client(i)) for i in range(CLIENTS)]
    await asyncio.sleep(seconds)
    phase["swap"] = True
    # The swap as the daemon does it: load the new version off the loop, then warm up and switch.
    new = await asyncio.to_thread(rt.load, MODELS / "digits_large_int8.onnx", version="2")
    await engine.swap("d", new)
    phase["swap"] = False
    await asyncio.sleep(seconds / 4)
    stop.set()
    await asyncio.gather(*tasks)
    return steady, during, failures


def bench_swap(rt: Runtime, x: np.ndarray, seconds: float) -> None:
    print(f"== hot swap digits_large_fp32 -> digits_large_int8 under {CLIENTS} clients (batching on)")
    engine = Engine(Metrics())
    engine.add_model(
        rt.load(MODELS / "digits_large_fp32.onnx", version="1"),
        ModelConfig("d", max_batch_size=32, max_queue_delay_us=500),
    )
    steady, during, failures = asyncio.run(_swap_run(engine, rt, x, seconds))
    p99s = float(np.percentile(steady, 99))
    p99d = float(np.percentile(during, 99))
    print(
        f"steady p99 {p99s * 1e3:.2f} ms ({len(steady)} req)  during swap p99 {p99d * 1e3:.2f} ms "
        f"({len(during)} req)  ratio {p99d / p99s:.2f}x  failed requests {failures}"
    )
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("batching", "cascade", "swap"))
    args = parser.parse_args()
    rt = Runtime("cpu-generic")
    data = np.load(MODELS / "digits_test.npz")
    x, y = data["x"], data["y"]
    if args.only in (None, "batching"):
        bench_batching(rt, x, args.seconds, args.rounds)
    if args.only in (None, "cascade"):
        bench_cascade(rt, x, y)
    if args.only in (None, "swap"):
        bench_swap(rt, x, args.seconds)


if __name__ == "__main__":
    main()
