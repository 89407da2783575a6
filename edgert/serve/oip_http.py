"""Open Inference Protocol v2 REST routes (plus Triton's repository extension) over a ServingPort."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import unquote

from edgert.errors import InputError, UnknownModelError
from edgert.metrics.timing import RequestTiming
from edgert.serve.http_server import Request, Response, error_response
from edgert.serve.oip_codec import (
    decode_infer_request,
    encode_infer_response,
    json_dumps,
    parse_header_length,
    tensor_metadata,
)
from edgert.serve.port import ModelMeta, ServingPort, error_text, status_for

__all__ = ["OipRouter", "metrics_router", "model_metadata_doc"]

log = logging.getLogger("edgert.serve.oip")

_JSON_TYPES = ("application/json", "")
_PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
#: Response header of a request that waited for its model to load (milliseconds; docs/memory.md).
COLD_LOAD_HEADER = "x-edgert-cold-load-ms"


def _json(doc: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, [json_dumps(doc)], headers=headers or [])


def model_metadata_doc(meta: ModelMeta) -> dict[str, Any]:
    """The OIP model metadata document."""
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": _PLATFORMS.get(meta.platform, meta.platform),
        "inputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in meta.inputs],
        "outputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in meta.outputs],
    }


class OipRouter:
    """Callable HTTP handler: sync for cheap routes, a coroutine for inference and repository calls."""

    def __init__(self, backend: ServingPort, *, token: str | None = None) -> None:
        self.backend = backend
        self.token = f"Bearer {token}".encode() if token else None

    def __call__(self, req: Request) -> Response | Awaitable[Response]:
        if self.token is not None and not self._authorized(req):
            return error_response(401, "missing or wrong bearer token", [("www-authenticate", "Bearer")])
        parts = [unquote(p) for p in req.path.strip("/").split("/")]
        if not parts or parts[0] != "v2":
            return error_response(404, f"no route for {req.path}; the API lives under /v2")
        try:
            return self._route(req, parts[1:])
        except Exception as exc:  # sync routes: same error mapping as async ones
            return self._error(exc, req)

    def upgrade(self, req: Request, transport: Any, rest: bytes) -> Response | None:
        """A WebSocket upgrade: a stream at /v2/models/{m}[/versions/{v}]/stream (serve/ws_streams.py)."""
        from edgert.serve import ws_streams

        if self.token is not None and not self._authorized(req):
            offered = ws_streams.offered_bearer(req)  # browsers cannot set Authorization
            if offered is None or not hmac.compare_digest(offered, self.token):
                return error_response(401, "missing or wrong bearer token", [("www-authenticate", "Bearer")])
        route = ws_streams.stream_route(req.path)
        if route is None or req.headers.get("upgrade", "").lower() != "websocket":
            return error_response(404, f"no WebSocket route for {req.path}; see /v2/models/{{m}}/stream")
        try:
            self.backend.model_meta(*route)
        except Exception as exc:
            return self._error(exc, req)
        ws_streams.WsStream(self.backend, *route).take_over(transport, ws_streams.raw_request(req), rest)
        return None

    def _authorized(self, req: Request) -> bool:
        given = req.headers.get("authorization", "").encode("latin-1")
        assert self.token is not None
        return hmac.compare_digest(given, self.token)

    def _route(self, req: Request, p: list[str]) -> Response | Awaitable[Response]:
        n = len(p)
        if n == 0:
            return self._get(req) or _json(self.backend.server_metadata())
        if p[0] == "health" and n == 2 and p[1] in ("live", "ready"):
            return self._get(req) or self._health(p[1])
        if p == ["models", "stats"]:  # Triton's statistics extension: every model
            return self._get(req) or _json(self.backend.inference_stats())
        if p[0] == "models" and n >= 2:
            name, rest = p[1], p[2:]
            version = None
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if not rest:
                return self._get(req) or _json(model_metadata_doc(self.backend.model_meta(name, version)))
            if rest == ["ready"]:
                return self._get(req) or self._model_ready(name, version)
            if rest == ["infer"]:
                return self._post(req) or self._infer(req, name, version)
            if rest == ["stats"]:
                return self._get(req) or _json(self.backend.inference_stats(name, version))
        if p[0] == "repository":
            if p[1:] == ["index"]:
                return self._post(req) or self._index()
            if n == 4 and p[1] == "models" and p[3] in ("load", "unload"):
                return self._post(req) or self._repository(req, p[2], p[3])
        if p == ["status"]:
            return self._get(req) or _json(self.backend.status())
        return error_response(404, f"no route for {req.method} {req.path}")

    @staticmethod
    def _get(req: Request) -> Response | None:
        return None if req.method in ("GET", "HEAD") else error_response(405, f"{req.path} takes GET")

    @staticmethod
    def _post(req: Request) -> Response | None:
        return None if req.method == "POST" else error_response(405, f"{req.path} takes POST")

    def _health(self, which: str) -> Response:
        ok = self.backend.live() if which == "live" else self.backend.ready()
        return _json({which: ok}, 200 if ok else 503)

    def _model_ready(self, name: str, version: str | None) -> Response:
        meta = self.backend.model_meta(name, version)
        return _json({"name": name, "ready": meta.ready}, 200 if meta.ready else 503)

    def _index(self) -> Response:
        items = []
        for name in self.backend.model_names():
            try:
                meta = self.backend.model_meta(name)
            except UnknownModelError:
                continue
            for version in meta.versions:
                items.append(
                    {"name": name, "version": version, "state": "READY" if meta.ready else "UNAVAILABLE"}
                )
        return _json(items)

    def _error(
        self, exc: BaseException, req: Request, request_id: str | None = None, trace_id: str | None = None
    ) -> Response:
        status = 415 if isinstance(exc, _UnsupportedMedia) else status_for(exc)
        headers = (
            [("retry-after", str(max(1, round(getattr(exc, "retry_after", 1)))))] if status == 503 else []
        )
        if status >= 500 and not hasattr(exc, "retry_after"):
            log.error("request failed", exc_info=exc,
                      extra={"path": req.path, "request_id": request_id, "trace_id": trace_id})
        elif log.isEnabledFor(logging.INFO):
            log.info(
                "request refused",
                extra={
                    "path": req.path,
                    "status": status,
                    "request_id": request_id,
                    "trace_id": trace_id,
                    "error": error_text(exc),
                },
            )
        return error_response(status, error_text(exc), headers)

    async def _infer(self, req: Request, name: str, version: str | None) -> Response:
        header_len = req.headers.get("inference-header-content-length")
        request_id = req.headers.get("x-request-id")
        tracer = self.backend.tracer
        t = tracer.start("http", req.headers.get("traceparent"), req.received_ns or None)
        t.model = name
        try:
            hlen = self._check_content(req, header_len)
            decoded = _decode_timed(req.body, hlen, t)
            # The inputs are decoded (copied out of the body): free the body now, not after the
            # inference, so a queue of large requests holds each request's tensor and no more.
            req.body = b""
            request_id = decoded.id or request_id
            outcome = await self.backend.infer(
                name, decoded.inputs, version=version, outputs=decoded.output_names, request_id=request_id,
                timing=t,
            )
            t.version = t.version or outcome.model_version  # a cascade: the engine did not stamp it
            encode_start = time.monotonic_ns()
            header, chunks, header_length = encode_infer_response(
                outcome.model_name,
                outcome.model_version,
                outcome.outputs,
                request_id=decoded.id,
                requested=decoded.outputs,
                binary_default=decoded.binary_output_default,
            )
            t.encode_ns = time.monotonic_ns() - encode_start
        except Exception as exc:
            resp = self._error(exc, req, request_id, t.trace_id)
            resp.headers.append(("traceparent", tracer.reply_traceparent(t)))
            tracer.finish(t, resp.status)
            return resp
        extra = [("x-request-id", request_id)] if request_id and "x-request-id" in req.headers else []
        cold = getattr(outcome, "cold_load_s", None)  # the model was loaded for this request
        if cold:
            extra.append((COLD_LOAD_HEADER, f"{cold * 1000:.3f}"))
        extra.append(("traceparent", tracer.reply_traceparent(t)))
        tracer.finish(t, 200)
        if header_length is None:
            return Response(200, [header], headers=extra)
        extra.append(("inference-header-content-length", str(header_length)))
        return Response(200, [header, *chunks], content_type="application/octet-stream", headers=extra)

    @staticmethod
    def _check_content(req: Request, header_len: str | None) -> int | None:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if header_len is not None:
            return parse_header_length(header_len)
        if ctype not in _JSON_TYPES:
            raise _UnsupportedMedia(
                f"content type {ctype!r} is not accepted for inference",
                hint="send Content-Type: application/json "
                "(or the binary extension with Inference-Header-Content-Length)",
            )
        return None

    async def _repository(self, req: Request, name: str, action: str) -> Response:
        try:
            version = None
            if req.body:
                from edgert.serve.oip_codec import json_loads

                doc = json_loads(req.body)
                params = doc.get("parameters", {}) if isinstance(doc, dict) else {}
                version = params.get("version") if isinstance(params, dict) else None
                if version is not None:
                    version = str(version)
            if action == "load":
                await self.backend.load(name, version)
            else:
                await self.backend.unload(name)
        except ValueError:
            return error_response(
                400, 'repository request body must be JSON, e.g. {"parameters": {"version": "2"}}'
            )
        except Exception as exc:
            return self._error(exc, req)
        return _json({})


def _decode_timed(body: bytes, hlen: int | None, t: RequestTiming) -> Any:
    """Decode an infer request, stamping the decode time (and thread CPU on a sampled request) on ``t``."""
    start = time.monotonic_ns()
    cpu0 = time.thread_time_ns() if t.cpu else 0
    decoded = decode_infer_request(body, hlen)
    t.decode_ns = time.monotonic_ns() - start
    if cpu0:
        t.cpu_input_ns += time.thread_time_ns() - cpu0
    return decoded


class _UnsupportedMedia(InputError):
    """Wrong Content-Type (mapped to 415)."""


def metrics_router(render: Any) -> Any:
    """A handler serving ``render()`` (Prometheus text) at /metrics and 404 elsewhere."""

    def handle(req: Request) -> Response:
        if req.path != "/metrics":
            return error_response(404, "only /metrics is served here")
        return Response(200, [render()], content_type="text/plain; version=0.0.4; charset=utf-8")

    return handle
