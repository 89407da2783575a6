"""Streams over the Unix socket, against a real daemon serving the real digits models.

Policies all / latest / drop-oldest and a deadline, windows assembled from chunks, the sync and
async client iterators, and bad input: a push after close, a window over the frame cap, a chunk of
the wrong dtype or shape mid-stream, a client that stops reading, 1,000 idle streams, a disconnect
mid-window. Assertions are on counts, order and RSS, never on time.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.errors import InputError, UnknownModelError
from edgert.serve import uds_frames as fr
from edgert.serve.uds_limits import UdsLimits
from tests.serve.daemon_harness import Running
from tests.serve.test_uds import frame, read_frame
from tests.serve.test_uds_limits import connect, extra_server, wait_until

pytestmark = pytest.mark.integration

MODEL = "digits-small"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_raw(path: str, opts: dict | None = None, model: str = MODEL) -> tuple[socket.socket, dict]:
    s = connect(path)
    s.sendall(frame(fr.STREAM_OPEN, {"m": model, "opts": opts or {}}))
    kind, doc, _ = read_frame(s)
    assert kind == fr.OK, doc
    return s, doc["stream"]


def push(i: int, x: np.ndarray, name: str = "pixels") -> bytes:
    return frame(fr.STREAM_PUSH, {"id": i, "ts": float(i)}, {name: x})


def read_until_end(s: socket.socket) -> tuple[list[dict], dict]:
    results = []
    while True:
        kind, doc, arrays = read_frame(s)
        if kind == fr.STREAM_END:
            return results, doc
        assert kind == fr.STREAM_RESULT, (kind, doc)
        doc["outputs"] = arrays
        results.append(doc)


def open_streams(served: Running) -> float:
    return served.daemon.metrics.streams.open_streams().get(MODEL, 0.0)


# -- policies ---------------------------------------------------------------------------------------------
def test_all_answers_every_item_in_order_with_the_request_path_outputs(served: Running, digits) -> None:
    x, _ = digits
    with Client("unix://" + served.socket) as c:
        stream = c.stream(MODEL, [(f"f{i}", 100.0 + i, x[i]) for i in range(40)], policy="all", queue=2)
        results = list(stream)
        want = np.concatenate([c.infer(MODEL, {"pixels": x[i : i + 20]})["logits"] for i in (0, 20)])
    assert [r.id for r in results] == [f"f{i}" for i in range(40)]
    assert [r.ts for r in results] == [100.0 + i for i in range(40)]
    assert all(r.dropped == 0 and r.error is None and r.lag_ms >= 0 for r in results)
    np.testing.assert_allclose(
        np.concatenate([r.outputs["logits"] for r in results]), want, rtol=1e-5, atol=1e-5
    )
    assert stream.ended is not None and stream.ended.reason == "closed" and stream.ended.dropped == 0
    assert stream.info is not None and stream.info["input"] == "pixels" and stream.info["shape"] == [64]


def test_async_iterator_gives_the_same_results(served: Running, digits) -> None:
    x, _ = digits

    async def items():
        for i in range(12):
            yield i, x[i]
            await asyncio.sleep(0)

    async def run() -> list:
        with Client("unix://" + served.socket) as c:
            return [r async for r in c.stream(MODEL, items())]

    results = asyncio.run(run())
    assert [r.id for r in results] == list(range(12))
    with Client("unix://" + served.socket) as c:
        want = c.infer(MODEL, {"pixels": x[:12]})["logits"]
    np.testing.assert_allclose(
        np.concatenate([r.outputs["logits"] for r in results]), want, rtol=1e-5, atol=1e-5
    )


def test_latest_keeps_the_newest_and_accounts_for_every_item(served: Running, digits) -> None:
    x, _ = digits
    n = 400
    s, info = open_raw(served.socket, {"policy": "latest"})
    with s:
        s.sendall(b"".join(push(i, x[i % len(x)]) for i in range(n)) + frame(fr.STREAM_CLOSE, {}))
        results, end = read_until_end(s)
    ids = [r["id"] for r in results]
    assert ids == sorted(ids) and ids[-1] == n - 1  # the newest item always runs
    assert len(results) + sum(r["dropped"] for r in results) == n == len(results) + end["dropped"]
    assert end["dropped"] > 0 and info["queue"] == 1


def test_drop_oldest_keeps_a_bounded_queue(served: Running, digits) -> None:
    x, _ = digits
    n = 300
    s, _ = open_raw(served.socket, {"policy": "drop-oldest", "queue": 3})
    with s:
        s.sendall(b"".join(push(i, x[i % len(x)]) for i in range(n)) + frame(fr.STREAM_CLOSE, {}))
        results, end = read_until_end(s)
    ids = [r["id"] for r in results]
    assert ids == sorted(ids) and ids[-3:] == [n - 3, n - 2, n - 1]  # the queue's last three survive
    assert len(results) + end["dropped"] == n and end["dropped"] > 0


def test_deadline_drops_items_that_waited_too_long(served: Running, digits) -> None:
    x, _ = digits
    n = 200
    s, info = open_raw(served.socket, {"policy": "all", "queue": 256, "deadline_ms": 0.001})
    with s:
        # one write: every item waits behind the parsing of the others, far beyond 1 us
        s.sendall(b"".join(push(i, x[i % len(x)]) for i in range(n)) + frame(fr.STREAM_CLOSE, {}))
        results, end = read_until_end(s)
    assert len(results) + end["dropped"] == n and end["dropped"] > 0
    assert info["deadline_ms"] == pytest.approx(0.001)
    text = served.daemon.metrics.render_prometheus().decode()
    assert f'edgert_stream_dropped_items{{model="{MODEL}"}}' in text


def test_a_stream_takes_the_same_path_as_requests_for_a_cascade(served: Running, digits) -> None:
    x, y = digits
    with Client("unix://" + served.socket) as c:
        results = list(c.stream("digits", [x[i] for i in range(30)]))
    assert [r.id for r in results] == list(range(30))
    hits = sum(int(np.argmax(r.outputs["logits"])) == int(y[i]) for i, r in enumerate(results))
    assert hits >= 27


# -- windows ----------------------------------------------------------------------------------------------
def test_windows_arrive_every_hop_and_match_the_assembled_input(served: Running, digits) -> None:
    x, _ = digits
    signal = x[:6].reshape(-1)  # 384 samples
    chunks = [signal[i : i + 8] for i in range(0, len(signal), 8)]
    with Client("unix://" + served.socket) as c:
        stream = c.stream(MODEL, chunks, window=64, hop=16)
        results = list(stream)
        starts = list(range(0, len(signal) - 64 + 1, 16))
        want = c.infer(MODEL, {"pixels": np.stack([signal[s : s + 64] for s in starts])})["logits"]
    # the chunk that completes window k (samples s..s+63) is chunk (s + 64) / 8 - 1
    assert [r.id for r in results] == [(s + 64) // 8 - 1 for s in starts]
    np.testing.assert_allclose(
        np.concatenate([r.outputs["logits"] for r in results]), want, rtol=1e-5, atol=1e-5
    )
    assert stream.info is not None and stream.info["window"] == 64 and stream.info["hop"] == 16


# -- bad input ----------------------------------------------------------------------------------------
def test_push_after_close_is_refused_and_the_daemon_serves_on(served: Running, digits) -> None:
    x, _ = digits
    s, _ = open_raw(served.socket)
    with s:
        s.sendall(push(0, x[0]) + frame(fr.STREAM_CLOSE, {}) + push(1, x[1]))
        results, end = read_until_end(s)
    assert [r["id"] for r in results] == [1, 0] or [r["id"] for r in results] == [0, 1]
    refused = next(r for r in results if r["id"] == 1)
    assert "after the stream was closed" in refused["error"] and refused["status"] == 400
    assert end["reason"] == "closed" and end["results"] == 1
    with Client("unix://" + served.socket) as c:
        assert c.ready() and c.infer(MODEL, {"pixels": x[:1]})["logits"].shape == (1, 10)


def test_window_larger_than_the_frame_cap_is_refused_at_open(served: Running, tmp_path: Path) -> None:
    with extra_server(served, tmp_path, UdsLimits(max_frame_bytes=200)) as (_, path):
        s = connect(path)
        with s:
            s.sendall(frame(fr.STREAM_OPEN, {"m": MODEL, "opts": {"window": 64}}))
            kind, doc, _ = read_frame(s)
            assert kind == fr.ERROR and doc["status"] == 400
            assert "a window of 64 samples is 256 bytes, over the 200-byte frame cap" in doc["error"]
            assert s.recv(1) == b""  # closed after the error
        with Client("unix://" + path) as c, pytest.raises(InputError, match="over the 200-byte frame cap"):
            list(c.stream(MODEL, [], window=64))


def test_unknown_model_and_bad_options_are_refused_with_their_names(served: Running) -> None:
    with Client("unix://" + served.socket) as c:
        with pytest.raises(UnknownModelError, match="nope"):
            list(c.stream("nope", []))
        with pytest.raises(InputError, match="policy must be one of"):
            list(c.stream(MODEL, [], policy="sometimes"))


def test_wrong_chunk_mid_stream_names_expected_and_got_and_the_stream_goes_on(
    served: Running, digits
) -> None:
    x, _ = digits
    signal = x[:2].reshape(-1)
    s, _ = open_raw(served.socket, {"window": 64, "hop": 64})
    with s:
        data = [push(i, signal[i * 16 : (i + 1) * 16]) for i in range(4)]
        data.insert(2, push(100, signal[:16].astype(np.float64)))  # wrong dtype
        data.insert(3, push(101, signal[:16].reshape(4, 4)))  # wrong shape
        s.sendall(b"".join(data) + push(4, signal[64:80]) + frame(fr.STREAM_CLOSE, {}))
        results, end = read_until_end(s)
    errors = {r["id"]: r["error"] for r in results if "error" in r}
    assert "expected float32 with shape [*], got float64 with shape [16]" in errors[100]
    assert "expected float32 with shape [*], got float32 with shape [4, 4]" in errors[101]
    assert [r["id"] for r in results if "error" not in r] == [3]  # the window still completes
    assert end["results"] == 1


def test_disconnect_mid_window_frees_the_stream(served: Running, digits) -> None:
    x, _ = digits
    before = open_streams(served)
    s, _ = open_raw(served.socket, {"window": 64, "hop": 16})
    assert wait_until(lambda: open_streams(served) >= before + 1)
    s.sendall(b"".join(push(i, x[0][i * 8 : (i + 1) * 8]) for i in range(5)))  # 40 of 64 samples
    s.close()
    assert wait_until(lambda: open_streams(served) <= before), "the stream ends when its client goes away"
    with Client("unix://" + served.socket) as c:
        assert len(list(c.stream(MODEL, [x[0], x[1]]))) == 2


def flood(s: socket.socket, payload: bytes, limit: int, idle_s: float = 2.0) -> int:
    """Send ``payload`` until the server stops reading (nothing taken for ``idle_s``) or ``limit`` bytes."""
    s.setblocking(False)
    sent = 0
    view = memoryview(payload)
    while sent < limit:
        if not select.select([], [s], [], idle_s)[1]:
            break
        try:
            sent += s.send(view[sent % len(payload) :])
        except BlockingIOError:
            continue
    return sent


def test_client_that_stops_reading_latest_stays_bounded_all_back_pressures(served: Running, digits) -> None:
    x, _ = digits
    items = 20_000
    one = push(0, x[0])
    burst = one * items  # the same bytes are re-sent: the client holds one copy
    # latest: the daemon keeps reading and dropping, so memory stays flat however much is pushed
    s, _ = open_raw(served.socket, {"policy": "latest"})
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    base = rss_kib()
    with s:
        sent = flood(s, burst, 5 * len(burst), idle_s=15.0)  # a liveness bound on a busy machine
        assert sent == 5 * len(burst)  # never held: latest does not back-pressure
        assert rss_kib() - base < 40 * 1024
    # all: the daemon stops reading once the queue is full and results are unread
    s, _ = open_raw(served.socket, {"policy": "all", "queue": 4})
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with s:
        sent = flood(s, burst, len(burst))
        assert sent < len(burst), "the sender is held (back-pressure)"
        accepted = sent // len(one)
        s.setblocking(True)
        s.settimeout(30)
        rest = burst[sent : (accepted + 1) * len(one)] if sent % len(one) else b""
        accepted += 1 if rest else 0
        # now read: the daemon catches up, reads the rest of the frame that was cut and the close
        sender = threading.Thread(target=s.sendall, args=(rest + frame(fr.STREAM_CLOSE, {}),))
        sender.start()
        results, end = read_until_end(s)
        sender.join()
    assert len(results) == accepted and end["dropped"] == 0  # nothing was dropped


def test_a_thousand_idle_streams_keep_the_daemon_ready_in_bounded_memory(served: Running, digits) -> None:
    x, _ = digits
    before = open_streams(served)  # streams other tests may still be ending
    base = rss_kib()
    socks = []
    try:
        for _ in range(1000):
            socks.append(open_raw(served.socket, {"policy": "latest"})[0])
        assert wait_until(lambda: open_streams(served) >= 1000)
        grown = rss_kib() - base
        with Client("unix://" + served.socket) as c:
            assert c.ready()
            assert c.infer(MODEL, {"pixels": x[:1]})["logits"].shape == (1, 10)
            assert [r.id for r in c.stream(MODEL, [x[0], x[1]])] == [0, 1]
        assert grown < 64 * 1024, f"1,000 idle streams took {grown} KiB"
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: open_streams(served) <= before)


def test_idle_stream_ends_after_its_timeout(served: Running) -> None:
    s, info = open_raw(served.socket, {"idle_timeout_s": 0.2})
    with s:
        results, end = read_until_end(s)
    assert results == [] and end["reason"] == "idle" and info["idle_timeout_s"] == 0.2


def test_streams_need_the_socket_client(served: Running) -> None:
    with Client(served.http_url) as c, pytest.raises(InputError, match="need a unix:// URL") as err:
        c.stream(MODEL, [])
    assert err.value.hint is not None and "/v2/models/{model}/stream" in err.value.hint
