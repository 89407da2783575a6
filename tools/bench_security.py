"""Benchmark: encrypted-store cold load vs plaintext load, envelope throughput, decrypt peak RSS.

Run: python tools/bench_security.py [--rounds 7] [--big-mb 100] [--json PATH]
Loads are interleaved in one run (plaintext, encrypted, first, then the reverse, ...) and medians
compared. The plaintext load reads the .onnx/.tflite file and hands its bytes to the backend. The
encrypted load goes through the store exactly as the daemon does (state, package read, header,
key, AES-GCM decrypt into one bytes object, backend, wipe when collected). "encrypted" is a repeated
load of the same version (a reload, or a cold load after the memory budget unloaded it): the store
reuses the header it verified and the key it unwrapped for byte-identical headers
(edgert/security/headermemo.py). "first" is a first load of that package (memo cleared before it,
as at daemon start): header parse, canonical check, binding and HPKE unwrap included.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgert import Runtime  # noqa: E402
from edgert.device.importing import import_plaintext  # noqa: E402
from edgert.security import package as pkg  # noqa: E402
from edgert.security.keys import DeviceKeys, init_keystore  # noqa: E402
from edgert.security.loader import load_from_store, open_store  # noqa: E402
from edgert.security.membuf import PlaintextBuffer  # noqa: E402

MODELS = ["digits_small_int8.onnx", "digits_large_int8.onnx", "digits_small_int8.tflite",
          "mobilenetv2_int8.onnx", "generated/mobilenetv2_fp32.onnx"]
IO = ([{"name": "x", "dtype": "uint8", "shape": [None]}], [{"name": "y", "dtype": "uint8", "shape": [None]}])


def bench_loads(rounds: int) -> dict[str, Any]:
    """Interleaved plaintext / encrypted / first loads per model; the summary for ``--json``."""
    root = Path(tempfile.mkdtemp(prefix="edgert-bench-"))
    keys = init_keystore(root / "keys")
    store = open_store(root, keys)
    rt = Runtime(profile="cpu-generic")
    summary: dict[str, Any] = {"rounds": rounds, "ratios": {}, "first_ratios": {}, "ms": {}}
    print(f"{'model':34} {'size MB':>8} {'plain ms':>9} {'encrypted ms':>13} {'ratio':>6} "
          f"{'first ms':>9} {'ratio':>6}")
    for rel in MODELS:
        path = REPO / "models" / rel
        if not path.exists():
            print(f"{rel:34} (missing; make it with tools/make_models.py)")
            continue
        name = path.stem + ("_" + path.suffix[1:] if path.suffix != ".onnx" else "")
        import_plaintext(store, path, name=name)

        def first_load(name: str = name) -> None:
            store.headers.clear()  # nothing verified yet: as the first load after the daemon starts
            load_from_store(rt, store, name).close()

        loads = {"plain": lambda: rt.load(path).close(),  # noqa: B023 - used within this iteration
                 "enc": lambda: load_from_store(rt, store, name).close(),  # noqa: B023
                 "first": first_load}
        took: dict[str, list[float]] = {k: [] for k in loads}
        for i in range(rounds + 1):  # round 0 warms caches and is dropped
            # Forward then reverse order, so that no kind always runs right after another's session was freed.
            order = list(loads) if i % 2 else list(loads)[::-1]
            for which in order:
                t0 = time.perf_counter()
                loads[which]()
                if i:
                    took[which].append(time.perf_counter() - t0)
        p, e, f = (statistics.median(took[k]) * 1000 for k in ("plain", "enc", "first"))
        size_mb = path.stat().st_size / 1e6
        print(f"{rel:34} {size_mb:8.2f} {p:9.2f} {e:13.2f} {e / p:6.3f} {f:9.2f} {f / p:6.3f}")
        summary["ratios"][rel] = round(e / p, 3)  # repeated load of the same version
        summary["first_ratios"][rel] = round(f / p, 3)  # first load of the package
        summary["ms"][rel] = {"plain": round(p, 3), "encrypted": round(e, 3), "first": round(f, 3)}
    return summary


def bench_big(mb: int) -> dict[str, float]:
    """Encrypt and decrypt a random model of ``mb`` MB; throughput and decryption's peak RSS growth."""
    tmp = Path(tempfile.mkdtemp(prefix="edgert-bench-big-"))
    src = tmp / "random.onnx"
    with open(src, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    keys = DeviceKeys.generate()
    out_path = tmp / "random.edgepkg"
    t0 = time.perf_counter()
    with open(out_path, "wb") as out:
        pkg.create_package([pkg.VariantSource(src, "fp32", "onnx", *IO)], out, name="random", version="1",
                           recipients=[keys.wrap_public], signer=keys.sign, now=datetime.now(timezone.utc))
    enc_s = time.perf_counter() - t0
    src.unlink()
    kdir = tmp / "keys"
    from edgert.security.keys import KEY_FILES, _pem

    kdir.mkdir(mode=0o700)
    for role, fname in KEY_FILES.items():
        fd = os.open(kdir / fname, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, _pem(getattr(keys, role)))
        os.close(fd)
    child = subprocess.run([sys.executable, __file__, "--decrypt-child", str(out_path), str(kdir)],
                           capture_output=True, text=True, check=True)
    dec_s, base_mb, peak_mb = (float(x) for x in child.stdout.split())
    print(f"\n{mb} MB random model: encrypt {mb / enc_s:.0f} MB/s, "
          f"decrypt (into memory) {mb / dec_s:.0f} MB/s")
    print(f"decrypt peak RSS {peak_mb:.1f} MB (baseline {base_mb:.1f} MB): growth {peak_mb - base_mb:.1f} MB "
          f"= {(peak_mb - base_mb) / mb:.3f}x the model size")
    return {"mb": mb, "encrypt_mb_s": round(mb / enc_s, 1), "decrypt_mb_s": round(mb / dec_s, 1),
            "peak_rss_growth_x_model": round((peak_mb - base_mb) / mb, 3)}


def decrypt_child(package_path: str, keys_dir: str) -> None:
    from edgert.security.keys import load_keystore

    keys = load_keystore(Path(keys_dir))
    # Reset the peak-RSS mark so import-time peaks do not hide the decryption's own growth.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    # The path a model load takes: straight into one uninitialised bytes object.
    with open(package_path, "rb") as f:
        header = pkg.read_header(f)
        variant = header.manifest.variants[0]
        buf = PlaintextBuffer(variant.plaintext_size)
        pkg.decrypt_payload(f, header, header.key_for(keys.wrap), variant=variant, out=buf.view)
        out = buf.take()
    dt = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    assert len(out) == variant.plaintext_size
    print(dt, base, peak)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--big-mb", type=int, default=100)
    ap.add_argument("--json", type=Path, default=None, help="also write a summary to this file")
    ap.add_argument("--decrypt-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.decrypt_child:
        decrypt_child(*args.decrypt_child)
        return
    summary = bench_loads(args.rounds)
    if args.big_mb > 0:  # --big-mb 0 runs the load rows only
        summary["big"] = bench_big(args.big_mb)
    if args.json:  # for tools/bench_issue10.py
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    io.DEFAULT_BUFFER_SIZE = max(io.DEFAULT_BUFFER_SIZE, 1 << 16)
    main()
