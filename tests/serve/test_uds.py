"""The Unix-socket fast path against a real daemon: our client, raw frames, bad input, ordering, timeouts."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.config import parse_config
from edgert.errors import InputError, ServeError, UnknownModelError
from edgert.serve import uds_frames as fr
from tests.serve.daemon_harness import MODELS, Running, config_text, start_daemon

pytestmark = pytest.mark.integration

# digits-small runs inline (eager path), digits-large goes through the batcher (a task per request),
# so pipelined requests to both exercise the mix of inline and suspended requests on one connection.
MIXED = f"""
[[models]]
name = "digits-small"
path = "{MODELS / "digits_small_int8.onnx"}"
[[models]]
name = "digits-large"
path = "{MODELS / "digits_large_int8.onnx"}"
max_batch_size = 64
max_queue_delay_us = 2000
[[cascades]]
name = "digits"
small = "digits-small"
large = "digits-large"
threshold = 0.9
"""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A daemon with one inline and one batched model."""
    tmp = tmp_path_factory.mktemp("uds")
    running = start_daemon(parse_config(config_text(tmp, models=MIXED), "test"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_test.npz")
    return data["x"], data["y"]


def frame(kind: int, meta: dict, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    return b"".join(bytes(b) for b in fr.encode_frame(kind, meta, tensors))


def read_frame(s: socket.socket) -> tuple[int, dict, dict[str, np.ndarray]]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            assert chunk, "daemon closed the connection"
            buf += chunk
        return buf

    body_len, kind, meta_len = fr.parse_header(exact(fr.HEADER.size), 1 << 30)
    meta, data = fr.decode_body(exact(body_len), meta_len)
    return kind, meta, (fr.decode_tensors(meta, data, meta_len) if "t" in meta else {})


def test_client_infer_matches_in_process_for_inline_batched_and_cascade(mixed, xy):
    from edgert import Runtime

    x, y = xy
    want = {
        n: Runtime("cpu-generic").load(MODELS / f).infer({"pixels": x[:16]})["logits"]
        for n, f in (("digits-small", "digits_small_int8.onnx"), ("digits-large", "digits_large_int8.onnx"))
    }
    with Client(f"unix://{mixed.socket}") as c:
        for name in ("digits-small", "digits-large"):
            got = c.infer(name, {"pixels": x[:16]})["logits"]
            np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5)
        cascade = c.infer("digits", {"pixels": x[:32]})["logits"]
        assert (cascade.argmax(1) == y[:32]).mean() > 0.85


def test_pipelined_frames_to_inline_and_batched_models_come_back_in_order(mixed, xy):
    """Inline requests finish eagerly, batched ones suspend: replies must still keep request order."""
    x, _ = xy
    names = ["digits-small", "digits-large"] * 20
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(mixed.socket)
        s.sendall(
            b"".join(
                frame(fr.INFER, {"m": n, "id": str(i)}, {"pixels": x[i : i + 1]}) for i, n in enumerate(names)
            )
        )
        for i, n in enumerate(names):
            kind, meta, arrays = read_frame(s)
            assert kind == fr.OK, meta
            assert (meta["id"], meta["m"]) == (str(i), n)
            assert arrays["logits"].shape == (1, 10)


def test_concurrent_clients_on_threads(mixed, xy):
    x, _ = xy
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with Client(f"unix://{mixed.socket}") as c:
                for i in range(30):
                    j = (k * 31 + i) % len(x)
                    name = "digits-large" if i % 2 else "digits-small"
                    assert c.infer(name, {"pixels": x[j : j + 1]})["logits"].shape == (1, 10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_bad_requests_get_error_frames_and_the_connection_survives(mixed, xy):
    x, _ = xy
    cases = [
        (frame(fr.INFER, {"m": "nope"}, {"pixels": x[:1]}), 404, "unknown model"),
        (frame(fr.INFER, {"m": "digits-small", "v": "9"}, {"pixels": x[:1]}), 404, "version"),
        (frame(fr.INFER, {"m": "digits-small"}, {"pixels": x[:1, :32]}), 400, "pixels"),
        (frame(fr.INFER, {"m": "digits-small"}, {"pixels": x[:1].astype(np.int64)}), 400, "pixels"),
        (frame(fr.INFER, {"m": "digits-small"}, {"image": x[:1]}), 400, "pixels"),
        (frame(fr.INFER, {"t": []}), 400, "model name"),
    ]
    # a tensor description that claims more bytes than the frame carries
    meta = b'{"m":"digits-small","t":[["pixels","FP32",[100000,64]]]}'
    cases.append((struct.pack("<IBBHI", len(meta), fr.INFER, 0, 0, len(meta)) + meta, 400, "past the end"))
    # bytes beyond the described tensors
    short = frame(fr.INFER, {"m": "digits-small"}, {"pixels": x[:1]})
    body = short[fr.HEADER.size :] + b"\0" * 8
    cases.append(
        (
            struct.pack(
                "<IBBHI", len(body), fr.INFER, 0, 0, short[8:12] and struct.unpack("<I", short[8:12])[0]
            )
            + body,
            400,
            "beyond",
        )
    )
    cases.append((frame(fr.INFER, {"m": "digits-small", "t": [["pixels", "BYTES", [1]]]}), 400, "BYTES"))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(mixed.socket)
        for data, status, fragment in cases:
            s.sendall(data)
            kind, doc, _ = read_frame(s)
            assert kind == fr.ERROR and doc["status"] == status, doc
            assert fragment in doc["error"], doc
        # the same connection still serves good requests
        s.sendall(frame(fr.INFER, {"m": "digits-small"}, {"pixels": x[:2]}))
        kind, _, arrays = read_frame(s)
        assert kind == fr.OK and arrays["logits"].shape == (2, 10)


def test_client_maps_errors_to_edgert_exceptions(mixed, xy):
    x, _ = xy
    with Client(f"unix://{mixed.socket}") as c:
        with pytest.raises(UnknownModelError, match="nope"):
            c.infer("nope", {"pixels": x[:1]})
        with pytest.raises(InputError, match="pixels"):
            c.infer("digits-small", {"pixels": x[:1, :10]})
        assert c.infer("digits-small", {"pixels": x[:1]})["logits"].shape == (1, 10)


@pytest.mark.parametrize(
    "head",
    [
        struct.pack("<IBBHI", 10, 99, 0, 0, 0),  # unknown kind
        struct.pack("<IBBHI", 2**31, fr.INFER, 0, 0, 0),  # huge declared frame
        struct.pack("<IBBHI", 4, fr.INFER, 0, 0, 100),  # meta longer than the frame
    ],
    ids=["unknown kind", "huge frame", "meta too long"],
)
def test_broken_framing_is_answered_once_then_closed(mixed, head):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(mixed.socket)
        s.sendall(head)
        kind, doc, _ = read_frame(s)
        assert kind == fr.ERROR and doc["status"] == 400
        assert s.recv(1) == b""  # closed: the stream cannot resynchronise
    with Client(f"unix://{mixed.socket}") as c:
        assert c.ready()


def test_disconnect_mid_frame_and_before_reply(mixed, xy):
    x, _ = xy
    data = frame(fr.INFER, {"m": "digits-large"}, {"pixels": x[:4]})
    for cut in (5, len(data) // 2, len(data)):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(mixed.socket)
            s.sendall(data[:cut])
    time.sleep(0.1)
    with Client(f"unix://{mixed.socket}") as c:
        assert c.infer("digits-large", {"pixels": x[:4]})["logits"].shape == (4, 10)


def test_client_times_out_on_a_silent_server(tmp_path: Path):
    """The kernel-side timeouts (no poll per call) still bound a call to a server that never answers."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen(1)
        c = Client(f"unix://{path}", timeout=0.2)
        peer, _ = srv.accept()
        try:
            start = time.monotonic()
            with pytest.raises(ServeError, match="timed out"):
                c.ready()
            assert time.monotonic() - start < 10  # bounded, not a speed assertion
            with pytest.raises(ServeError):  # the half-read stream is never reused
                c.ready()
        finally:
            c.close()
            peer.close()


def test_large_frame_is_sent_whole(mixed, xy):
    """A frame above the client's join threshold goes out vectored (resumed after partial sends).

    4,000 rows (1 MB) exceed the profile's batch limit, so the daemon must have received and decoded
    the whole frame to answer with that validation error, and the connection stays in sync.
    """
    x, _ = xy
    rows = np.tile(x, (12, 1))[:4000]
    with Client(f"unix://{mixed.socket}") as c:
        with pytest.raises(InputError, match="batch size 4000 exceeds"):
            c.infer("digits-small", {"pixels": rows})
        assert c.infer("digits-small", {"pixels": rows[:3]})["logits"].shape == (3, 10)
