"""HTTP load generator shared by the benchmark scripts: uvloop clients in separate processes.

Each process keeps ``conns`` kept-alive connections busy with one request at a time, so the
server, not the generator, sets the pace; the processes report their own CPU time so readers can
judge how much of the 2 cores the generator took.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any


def _worker(req: bytes, port: int, conns: int, seconds: float, q: Any, uds: str | None = None) -> None:
    import uvloop

    async def one(stop: float) -> int:
        if uds is not None:  # edgert's Unix-socket frames: 12-byte header, u32 body length first
            reader, writer = await asyncio.open_unix_connection(uds)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = 0
        while time.monotonic() < stop:
            writer.write(req)
            if uds is not None:
                head = await reader.readexactly(12)
                if head[4] != 0x80:
                    raise RuntimeError(f"socket request failed: frame kind {head[4]:#x}")
                await reader.readexactly(int.from_bytes(head[:4], "little"))
            else:
                head = await reader.readuntil(b"\r\n\r\n")
                if head[9:12] != b"200":  # "HTTP/1.x 200 ..."
                    raise RuntimeError(f"HTTP request failed: {head[:40]!r}")
                i = head.lower().find(b"content-length:")
                await reader.readexactly(int(head[i + 15 : head.find(b"\r\n", i)]))
            done += 1
        writer.close()
        await writer.wait_closed()
        return done

    async def main() -> int:
        stop = time.monotonic() + seconds
        return sum(await asyncio.gather(*(one(stop) for _ in range(conns))))

    c0 = time.process_time()
    try:
        total = uvloop.run(main())
    except Exception as exc:  # report it, or the parent would wait on the queue forever
        q.put((exc, 0.0))
        return
    q.put((total, time.process_time() - c0))


def throughput(
    req: bytes, port: int, clients: int, seconds: float, procs: int = 2, uds: str | None = None
) -> tuple[float, float]:
    """(req/s, load generator CPU in cores) for ``clients`` connections spread over ``procs`` processes.

    ``req`` is one whole HTTP request for 127.0.0.1:``port``, or, with ``uds`` (a socket path), one
    framed request of edgert's Unix-socket protocol (``edgert.serve.uds_frames.encode_frame``).
    """
    q: Any = mp.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ps = [mp.Process(target=_worker, args=(req, port, k, seconds, q, uds)) for k in per if k]
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    for r in results:
        if isinstance(r[0], Exception):
            raise RuntimeError(f"load generator failed: {r[0]!r}")
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results) / seconds
