"""``edgert trace tail``: follow the daemon's slow-request log lines (per-stage timings, trace ids).

The daemon logs JSON lines to stderr, which systemd sends to journald, so the source is a stream of
log lines: ``journalctl -u edgert -o cat -f | edgert trace tail`` or a file (``-f`` follows it).
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

#: How often a followed file is checked for new lines (s).
FOLLOW_POLL_S = 0.2


@click.group()
def trace() -> None:
    """Per-request traces: the slow-request log lines of the daemon."""


def _lines(stream: IO[str], follow: bool, path: Path | None) -> Iterator[str]:
    """Lines of ``stream``; with ``follow``, keep waiting for more (a truncated file restarts)."""
    while True:
        line = stream.readline()
        if line:
            yield line
            continue
        if not follow:
            return
        if path is not None and path.exists() and path.stat().st_size < stream.tell():
            stream.seek(0)  # truncated (or rotated in place): read it again from the start
        time.sleep(FOLLOW_POLL_S)


@trace.command("tail")
@click.argument("source", default="-", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("-f", "--follow", is_flag=True, help="Keep reading SOURCE as it grows (like tail -f).")
@click.option("-n", "--lines", "last", type=click.IntRange(min=0), default=None,
              help="Show only the last N matching records already in SOURCE, then follow.")
@click.option("--model", default="", help="Only requests to this model.")
@click.option("--trace-id", default="", help="Only this trace (32 hex digits).")
@click.option("--min-ms", type=click.FloatRange(min=0), default=0.0, help="Only requests slower than this.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON records unchanged.")
def tail(
    source: Path, follow: bool, last: int | None, model: str, trace_id: str, min_ms: float, as_json: bool
) -> None:
    """Show slow requests (stages in ms) from daemon log lines in SOURCE (default: stdin).

    \b
    journalctl -u edgert -o cat -f | edgert trace tail
    edgert trace tail -f /var/log/edgert.log --model digits
    The daemon logs every request slower than [daemon] slow_request_ms (0 logs all).
    """
    from edgert.metrics.slowlog import SlowFilter, format_slow, parse_slow_line

    keep = SlowFilter(model, trace_id, min_ms)

    def show(doc: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(doc, separators=(",", ":"), default=str))
        else:
            click.echo(format_slow(doc))
        sys.stdout.flush()

    path = None if str(source) == "-" else source
    stream: IO[str] = sys.stdin if path is None else open(path, encoding="utf-8", errors="replace")
    try:
        if last is not None:  # the backlog: only its last N matches, then what follows
            backlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=last)
            for line in _lines(stream, False, path):
                doc = parse_slow_line(line)
                if doc is not None and keep(doc):
                    backlog.append(doc)
            for doc in backlog:
                show(doc)
            if not follow:
                return
        for line in _lines(stream, follow, path):
            doc = parse_slow_line(line)
            if doc is not None and keep(doc):
                show(doc)
    finally:
        if path is not None:
            stream.close()
