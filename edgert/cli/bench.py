"""``edgert bench MODEL``: latency percentiles, throughput and CPU cost of in-process inference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgert.cli.common import echo_json, profile_option

#: Warm-up runs before timing (first runs allocate arenas and pick kernels).
WARMUP_RUNS = 20


def measure(
    model: Any,
    feed: dict[str, np.ndarray],
    seconds: float,
    max_iterations: int | None = None,
    cpu: dict[str, float] | None = None,
) -> np.ndarray:
    """Latencies (seconds) of back-to-back ``model.infer`` calls for ``seconds``.

    With ``cpu``, it receives the CPU seconds of the timed runs (after warm-up): ``process`` (every
    thread, onnxruntime's intra-op pool included) and ``thread`` (the calling thread alone).
    """
    for _ in range(WARMUP_RUNS):
        model.infer(feed)
    process0, thread0 = time.process_time(), time.thread_time()
    latencies = []
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter
    while True:
        t0 = clock()
        model.infer(feed)
        t1 = clock()
        latencies.append(t1 - t0)
        if t1 >= deadline or (max_iterations and len(latencies) >= max_iterations):
            break
    if cpu is not None:
        cpu["process"] = time.process_time() - process0
        cpu["thread"] = time.thread_time() - thread0
    return np.asarray(latencies)


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@profile_option
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=click.IntRange(min=0), help="Intra-op threads (0 = auto).")
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.05))
@click.option("--iterations", default=None, type=click.IntRange(min=1), help="Stop after this many runs.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2,…", help="Shape for dynamic dims.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(
    model_path: Path,
    profile: str,
    batch: int,
    threads: int | None,
    seconds: float,
    iterations: int | None,
    shapes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Benchmark MODEL in-process: p50/p90/p99 latency, throughput and the effective provider."""
    from edgert.cli.tensors import parse_shapes, random_inputs
    from edgert.runtime import ModelOptions, Runtime

    model = Runtime(profile).load(model_path, options=ModelOptions(threads=threads, max_batch=max(batch, 1)))
    feed = random_inputs(model.inputs, batch, parse_shapes(shapes))
    cpu: dict[str, float] = {}
    lat = measure(model, feed, seconds, iterations, cpu)
    total = float(lat.sum())
    p50, p90, p99 = (float(np.percentile(lat, q)) for q in (50, 90, 99))
    doc = {
        "model": str(model_path),
        "format": model.format,
        "profile": model.profile.name,
        "provider": model.provider,
        "batch": batch,
        "threads": threads if threads is not None else (model.profile.threads or "auto"),
        "iterations": int(lat.size),
        "p50_ms": round(p50 * 1e3, 4),
        "p90_ms": round(p90 * 1e3, 4),
        "p99_ms": round(p99 * 1e3, 4),
        "mean_ms": round(total / lat.size * 1e3, 4),
        "throughput_per_s": round(lat.size * batch / total, 1),
        "load_ms": round(model.load_seconds * 1e3, 2),
        # CPU cost per inference call (one call = `batch` rows): whole process, and the calling thread.
        "cpu_ms_per_inference": round(cpu["process"] / lat.size * 1e3, 4),
        "thread_cpu_ms_per_inference": round(cpu["thread"] / lat.size * 1e3, 4),
        "cpu_utilization": round(cpu["process"] / total, 3) if total else None,
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"model      {doc['model']} ({doc['format']})")
    click.echo(f"provider   {doc['provider']} (profile {doc['profile']}, threads {doc['threads']})")
    click.echo(f"batch      {batch}   runs {doc['iterations']}   load {doc['load_ms']} ms")
    click.echo(
        f"latency    p50 {doc['p50_ms']:.3f} ms   p90 {doc['p90_ms']:.3f} ms   p99 {doc['p99_ms']:.3f} ms"
    )
    click.echo(f"throughput {doc['throughput_per_s']:,.1f} inferences/s")
    click.echo(
        f"cpu        {doc['cpu_ms_per_inference']:.4f} ms per inference (calling thread "
        f"{doc['thread_cpu_ms_per_inference']:.4f} ms; {doc['cpu_utilization']} cores busy)"
    )
