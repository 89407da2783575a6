"""Where ``edgert demo``'s memory goes: VmRSS at each first import of a large package and each log line.

Runs the real demo command in this process (offline, a free port, a temporary socket) with an audit
hook on ``import`` events and a log-record hook, prints one row per step (VmRSS, RssAnon, RssFile in
kB, modules loaded, the step and its thread), and exits when the daemon is ready. The table in
docs/footprint.md comes from it.

    PYTHONPATH=$PWD python3 tools/profile_demo_rss.py
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

#: Packages whose first import starts a row (the large third-party ones and edgert's layers).
WATCH = frozenset({
    "asyncio", "numpy", "edgert.engine", "edgert.serve.http_server", "httptools", "cryptography",
    "simdjson", "orjson", "click", "edgert.security.store", "uvloop", "onnxruntime", "ai_edge_litert",
})

marks: list[tuple[str, dict[str, int], int]] = []


def status() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in kB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def mark(what: str) -> None:
    """Record one row."""
    marks.append((f"{what} [{threading.current_thread().name}]", status(), len(sys.modules)))


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "import" and args[0] in WATCH and not any(f"import {args[0]} " in m[0] for m in marks):
        mark(f"before import {args[0]}")


def main() -> None:
    """Run the demo until ready, then print the rows."""
    mark("interpreter and site")
    scratch = Path(tempfile.mkdtemp(prefix="profile-demo-"))
    tempfile.tempdir = str(scratch)  # the demo makes its state dir with mkdtemp: keep it in scratch
    sys.addaudithook(_on_audit)
    factory = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = factory(*args, **kwargs)
        mark(f"log {rec.name}: {rec.getMessage()[:40]}")
        return rec

    logging.setLogRecordFactory(record)
    import edgert.device.demo as demo

    install = demo.install_demo_store

    def timed_install(*args: Any, **kwargs: Any) -> None:
        mark("before install_demo_store")
        install(*args, **kwargs)
        mark("after install_demo_store")

    def ready(http: str, socket: str, metrics: str) -> str:
        mark("READY")
        print(f"{'VmRSS':>7} {'anon':>6} {'file':>6} {'mods':>4}  step (kB)")
        for what, st, mods in marks:
            print(f"{st['VmRSS']:7d} {st['RssAnon']:6d} {st['RssFile']:6d} {mods:4d}  {what}")
        sys.stdout.flush()
        shutil.rmtree(scratch, ignore_errors=True)  # the demo's state dir (a device key) is in it
        os._exit(0)  # the numbers are taken; no need to drain the daemon
        return ""  # not reached
    demo.install_demo_store = timed_install
    demo.demo_usage = ready  # the demo command calls it once the daemon is ready
    from edgert.cli.main import main as cli

    cli(["demo", "--http", "127.0.0.1:0", "--socket", str(scratch / "edgert.sock")])


if __name__ == "__main__":
    main()
