"""Pick the HTTP stack by measurement: one minimal OIP digits infer endpoint on each stack, side by side.

Every stack runs the same handler (edgert's OIP JSON codec + ``Model.infer`` on digits int8) in its
own server process with one worker on uvloop where the stack allows. The same load generators hit
each in turn, interleaved: one keep-alive client for latency (requests round-robin over the stacks)
and 32 clients from 2 uvloop processes for throughput (rounds alternate over the stacks). ``floor``
is a uvloop protocol answering a canned response without parsing or inference: what the kernel and
the event loop cost by themselves.

    pip install -e .[bench]      # uvicorn, granian, aiohttp (never runtime dependencies)
    python tools/bench_http_stacks.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from loadgen import throughput

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
STACKS = ("floor", "edgert", "uvicorn", "granian-rsgi", "granian-asgi", "aiohttp")
START_TIMEOUT_S = 30.0

_model: Any = None


def handle(body: bytes) -> bytes:
    """The shared endpoint: decode an OIP JSON infer request, run digits, encode the response."""
    global _model
    from edgert.serve.oip_codec import decode_infer_request, encode_infer_response

    if _model is None:  # loaded on first use: importing this module must not load models
        from edgert import ModelOptions, Runtime

        # One intra-op thread: otherwise each idle server's onnxruntime pool spin-waits after every
        # request and steals the cores the stack being measured needs.
        _model = Runtime("cpu-generic").load(
            MODELS / "digits_small_int8.onnx", options=ModelOptions(threads=1)
        )
    req = decode_infer_request(body)
    header, _, _ = encode_infer_response("digits", "1", _model.infer(req.inputs), request_id=req.id)
    return header


# -- the stacks ---------------------------------------------------------------------------------------
async def asgi_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Raw ASGI app (uvicorn, granian --interface asgi): no framework on top."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    out = handle(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


async def rsgi_app(scope: Any, proto: Any) -> None:
    """Granian's native RSGI interface."""
    out = handle(await proto())
    proto.response_bytes(200, [("content-type", "application/json")], out)


def serve(stack: str, port: int) -> None:
    """Run one stack's server in this process until terminated."""
    import uvloop

    handle(json_body())  # warm up (loads the model) before accepting traffic
    if stack == "uvicorn":
        import uvicorn

        uvicorn.run(asgi_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                    lifespan="off", log_level="warning", access_log=False)  # fmt: skip
    elif stack.startswith("granian"):
        from granian import Granian

        interface = stack.split("-")[1]
        Granian(f"bench_http_stacks:{interface}_app", address="127.0.0.1", port=port, interface=interface,
                workers=1, runtime_threads=1, loop="uvloop", log_enabled=False,
                working_dir=Path(__file__).parent).serve()  # fmt: skip
    elif stack == "aiohttp":
        from aiohttp import web

        async def infer(request: web.Request) -> web.Response:
            return web.Response(body=handle(await request.read()), content_type="application/json")

        app = web.Application()
        app.router.add_post("/v2/models/digits/infer", infer)
        uvloop.install()
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
    elif stack == "edgert":
        from edgert.serve.http_server import HttpServer, Request, Response

        def route(req: Request) -> Response:
            return Response(200, [handle(req.body)])

        async def main() -> None:
            await HttpServer(route).start("127.0.0.1", port)
            await asyncio.Event().wait()

        uvloop.run(main())
    elif stack == "floor":
        reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

        class Canned(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def data_received(self, data: bytes) -> None:  # one request per segment (client waits)
                self.transport.write(reply)

        async def floor() -> None:
            await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port)
            await asyncio.Event().wait()

        uvloop.run(floor())
    else:
        raise SystemExit(f"unknown stack {stack}")


# -- the load -----------------------------------------------------------------------------------------
def json_body() -> bytes:
    x = np.load(MODELS / "digits_test.npz")["x"][:1]
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode()


def http_request(port: int) -> bytes:
    body = json_body()
    return (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one Content-Length framed response off a keep-alive socket."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            j = head.find(b"\r\n", i)
            n = int(head[i + 15 : j if j > 0 else None])
            if len(buf) >= end + 4 + n:
                if not head.startswith(b"http/1.1 200"):
                    raise RuntimeError(f"bad response: {bytes(buf[: end + 4 + n])[:300]!r}")
                del buf[: end + 4 + n]
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def start(stack: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{REPO}"}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", stack, "--port", str(port)], env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    req = http_request(port)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(req)
                read_response(s, bytearray())
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{stack} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stacks", default=",".join(STACKS))
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    stacks = args.stacks.split(",")
    n, secs, rounds = (1500, 2.0, 2) if args.quick else (4000, 3.0, 3)
    body = json_body()
    for _ in range(300):
        handle(body)
    inproc = []
    for _ in range(n):
        t = time.perf_counter()
        handle(body)
        inproc.append(time.perf_counter() - t)
    servers = {s: start(s) for s in stacks}
    try:
        conns = {}
        for s, (_, port) in servers.items():
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[s] = (sock, http_request(port), bytearray())
        lat: dict[str, list[float]] = {s: [] for s in stacks}
        for i in range(n + 300):  # round-robin: load spikes on this shared machine hit every stack alike
            for s, (sock, req, buf) in conns.items():
                t = time.perf_counter()
                sock.sendall(req)
                read_response(sock, buf)
                if i >= 300:
                    lat[s].append(time.perf_counter() - t)
        for sock, _, _ in conns.values():
            sock.close()
        rps: dict[str, list[float]] = {s: [] for s in stacks}
        cpu: dict[str, list[float]] = {s: [] for s in stacks}
        for _ in range(rounds):
            for s, (_, port) in servers.items():
                r, c = throughput(http_request(port), port, 32, secs)
                rps[s].append(r)
                cpu[s].append(c)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(30)
    base = statistics.median(inproc) * 1e6
    report: dict[str, Any] = {"cpus": os.cpu_count(), "inproc_handler_p50_us": round(base, 1), "stacks": {}}
    for s in stacks:
        p50 = statistics.median(lat[s]) * 1e6
        report["stacks"][s] = {
            "p50_us": round(p50, 1),
            "p99_us": round(float(np.percentile(lat[s], 99)) * 1e6, 1),
            "added_over_inproc_p50_us": round(p50 - base, 1) if s != "floor" else None,
            "req_per_s_32_clients": round(statistics.median(rps[s])),
            "loadgen_cpu_cores": round(statistics.median(cpu[s]), 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
