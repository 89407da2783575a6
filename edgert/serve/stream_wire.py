"""What the stream transports share (Unix socket and WebSocket): open a session, frame its messages.

A stream is opened by a document ``{"m": model, "v": version?, "opts": {...}}`` (see
engine.stream_plan.StreamOptions for the options) and answered with the accepted stream
description; items are PUSH frames carrying one tensor, results RESULT frames (the output tensors,
or ``error``/``status`` for an item that failed), and the end an END frame. The framing is the
socket's (serve/uds_frames.py); the WebSocket sends the same frames as binary messages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from edgert.engine.stream_plan import StreamOptions, StreamPlan
from edgert.engine.streams import StreamEnd, StreamResult, StreamSession
from edgert.errors import EdgertError, InputError
from edgert.serve import uds_frames as fr
from edgert.serve.oip_codec import datatype_of
from edgert.serve.port import ServingPort, error_text, status_for

__all__ = [
    "MAX_STREAMS",
    "apply_frame",
    "describe",
    "end_frame",
    "item_error",
    "open_session",
    "push_arrays",
    "result_frame",
]

#: Streams served at once (per transport); more are refused with status 503.
MAX_STREAMS = 4096


def open_session(
    backend: ServingPort,
    doc: Mapping[str, Any],
    max_item_bytes: int,
    emit: Callable[[StreamResult], None],
    *,
    writable: Callable[[], Awaitable[None]] | None = None,
    on_space: Callable[[], None] | None = None,
) -> StreamSession:
    """Validate an open document against the served model and start a session (raises EdgertError)."""
    name = doc.get("m")
    if not isinstance(name, str) or not name:
        raise InputError('a stream open needs the model name in "m"', hint='e.g. {"m": "digits"}')
    version = doc.get("v")
    if version is not None and not isinstance(version, str):
        raise InputError(f'"v" must be a version string like "2", got {version!r}')
    opts = doc.get("opts", {})
    if not isinstance(opts, dict):
        raise InputError('"opts" must be a JSON object of stream options')
    options = StreamOptions.from_doc(name, opts, version)
    meta = backend.model_meta(name, version)
    plan = StreamPlan.bind(options, meta.inputs, max_item_bytes)
    observer = getattr(backend, "stream_stats", None)  # the daemon's metrics; absent in bare servers
    return StreamSession(plan, backend.infer, emit, writable=writable, on_space=on_space, observer=observer)


def describe(session: StreamSession) -> dict[str, Any]:
    """The accepted stream: what each push must carry, and the options in force."""
    plan, opts = session.plan, session.options
    doc: dict[str, Any] = {
        "m": opts.model,
        "input": plan.input,
        "datatype": datatype_of(plan.dtype),
        "shape": [-1 if d is None else d for d in plan.item_shape],
        "policy": opts.policy,
        "queue": session.queue.capacity,
        "idle_timeout_s": opts.idle_timeout_s,
    }
    if opts.deadline_s is not None:
        doc["deadline_ms"] = opts.deadline_s * 1000.0
    if plan.window is not None:
        doc.update(window=plan.window.window, hop=plan.window.hop, axis=plan.window.axis)
    return doc


def push_arrays(meta: Mapping[str, Any], data: memoryview, meta_len: int) -> tuple[Any, Any, dict[str, Any]]:
    """(id, ts, arrays) of a PUSH frame; arrays are zero-copy views into the frame."""
    item_id = meta.get("id")
    if (item_id is not None and not isinstance(item_id, (str, int))) or isinstance(item_id, bool):
        raise InputError(f'a push "id" must be a string or an integer, got {item_id!r}')
    ts = meta.get("ts")
    if ts is not None and (not isinstance(ts, (int, float)) or isinstance(ts, bool)):
        raise InputError(f'a push "ts" must be a number (your clock), got {ts!r}')
    return item_id, ts, fr.decode_tensors(meta, data, meta_len)


def result_frame(result: StreamResult) -> list[Any]:
    """A RESULT frame: the result's meta and its output tensors."""
    return fr.encode_frame(fr.STREAM_RESULT, result.meta(), result.outputs or None)


def end_frame(end: StreamEnd) -> list[Any]:
    """An END frame: why the stream ended and its totals."""
    return fr.encode_frame(fr.STREAM_END, end.meta())


def apply_frame(session: StreamSession, kind: int, meta_len: int, frame: memoryview) -> list[Any] | None:
    """Apply one client frame (PUSH or CLOSE; ``frame`` includes its header) to ``session``.

    Returns the frame to answer with when the item was refused (the stream carries on), else None.
    """
    item_id = None
    try:
        meta, data = fr.decode_body(frame[fr.HEADER.size :], meta_len)
        item_id = meta.get("id")
        if kind == fr.STREAM_PUSH:
            item_id, ts, arrays = push_arrays(meta, data, meta_len)
            session.push(item_id, ts, arrays)
        elif kind == fr.STREAM_CLOSE:
            session.close()
        else:
            raise InputError(f"frame kind {kind} is not valid in an open stream; send PUSH or CLOSE")
    except EdgertError as exc:
        return item_error(item_id, error_text(exc), status_for(exc))
    return None


def item_error(item_id: Any, message: str, status: int = 400) -> list[Any]:
    """A RESULT frame for a push refused before it ran (bad chunk, push after close)."""
    doc: dict[str, Any] = {"id": item_id, "error": message, "status": status}
    return fr.encode_frame(fr.STREAM_RESULT, doc)
