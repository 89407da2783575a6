"""W3C traceparent parsing, the timing record and the slow-request line format (pure logic)."""

from __future__ import annotations

import json
import logging

import pytest

from edgert.logs import JsonFormatter
from edgert.metrics.slowlog import SlowFilter, format_slow, parse_slow_line
from edgert.metrics.timing import RequestTiming, Tracer
from edgert.metrics.tracecontext import new_span_id, new_trace_id, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def test_the_spec_example_parses() -> None:
    ctx = parse_traceparent(VALID)
    assert ctx is not None
    assert (ctx.trace_id, ctx.parent_id, ctx.flags) == (TRACE, PARENT, "01")
    assert ctx.traceparent("b7ad6b7169203331") == f"00-{TRACE}-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"00-{TRACE}-{PARENT}-0g",  # not hex
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"0-{TRACE}-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE}-{PARENT}-01" + "x" * 600,  # oversized
    ],
)
def test_malformed_headers_are_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_future_version_keeps_its_prefix() -> None:
    ctx = parse_traceparent(f"cc-{TRACE}-{PARENT}-03-what-the-future-adds")
    assert ctx is not None and ctx.trace_id == TRACE and ctx.flags == "01"  # only "sampled" is passed on


def test_new_ids_are_well_formed_and_differ() -> None:
    ids = {new_trace_id() for _ in range(100)}
    assert len(ids) == 100
    for tid in ids:
        assert parse_traceparent(f"00-{tid}-{new_span_id()}-00") is not None


def test_tracer_keeps_a_valid_trace_and_replaces_a_bad_one() -> None:
    tracer = Tracer(None)
    kept = tracer.start("http", VALID)
    assert kept.trace_id == TRACE
    reply = parse_traceparent(tracer.reply_traceparent(kept))
    assert reply is not None and reply.trace_id == TRACE and reply.parent_id != PARENT
    fresh = tracer.start("http", f"00-{'0' * 32}-{PARENT}-01")
    assert len(fresh.trace_id) == 32 and fresh.trace_id != "0" * 32


def test_cpu_is_sampled_one_request_in_sixteen() -> None:
    from edgert.metrics.timing import CPU_SAMPLE_EVERY

    assert sum(RequestTiming().cpu for _ in range(CPU_SAMPLE_EVERY * 4)) == 4


def _slow_records(tracer: Tracer, timing: RequestTiming) -> list[dict]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("edgert.trace")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        tracer.finish(timing, 200)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return [json.loads(JsonFormatter().format(r)) for r in records]


def test_threshold_zero_logs_every_request_with_its_stages() -> None:
    tracer = Tracer(0)
    t = tracer.start("socket", VALID, received_ns=1_000)
    t.model, t.version, t.admitted_ns, t.decode_ns = "digits", "3", 3_000, 1_000
    t.queue_ns, t.infer_ns, t.encode_ns, t.batch_size = 5_000, 7_000, 2_000, 4
    (doc,) = _slow_records(tracer, t)
    assert doc["msg"] == "slow request" and doc["trace_id"] == TRACE
    assert doc["admission_ms"] == 0.001 and doc["queue_ms"] == 0.005 and doc["infer_ms"] == 0.007
    assert doc["batch_size"] == 4 and doc["load_ms"] is None and doc["encode_ms"] == 0.002
    line = json.dumps(doc)
    assert parse_slow_line(line) == doc
    assert parse_slow_line("Dec 03 08:00:00 pi edgert[812]: " + line) == doc  # a journald prefix
    assert SlowFilter(model="digits")(doc) and not SlowFilter(model="other")(doc)
    assert SlowFilter(trace_id=TRACE.upper())(doc) and not SlowFilter(trace_id="f" * 32)(doc)
    text = format_slow(doc)
    assert TRACE in text and "digits@3" in text and "batch 4" in text and "load -" in text


def test_a_fast_request_is_not_logged_and_a_negative_threshold_logs_nothing() -> None:
    assert _slow_records(Tracer(60_000), Tracer(0).start("http", None)) == []
    assert _slow_records(Tracer(-1), Tracer(0).start("http", None)) == []


@pytest.mark.parametrize("line", ["", "not json", '{"msg": "slow request"', '{"msg": "other"}', "[1,2]"])
def test_other_lines_are_skipped(line: str) -> None:
    assert parse_slow_line(line) is None


def test_slow_lines_are_limited_per_second_and_the_next_says_how_many_were_left_out() -> None:
    """A model always over the threshold must not write a line per request to journald."""
    now = [100.0]
    tracer = Tracer(0.000001, max_per_s=3, clock=lambda: now[0])  # every real request is "slow"
    logged = [_slow_records(tracer, tracer.start("http", None)) for _ in range(10)]
    assert [len(x) for x in logged] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert all("suppressed" not in x[0] for x in logged[:3])
    now[0] = 101.2  # the next second
    (doc,) = _slow_records(tracer, tracer.start("http", None))
    assert doc["suppressed"] == 7
    (doc,) = _slow_records(tracer, tracer.start("http", None))
    assert "suppressed" not in doc


def test_threshold_zero_is_not_rate_limited() -> None:
    tracer = Tracer(0, max_per_s=3, clock=lambda: 5.0)
    assert sum(len(_slow_records(tracer, tracer.start("http", None))) for _ in range(10)) == 10
