"""Device command processing: verify the fleet signature, dispatch, build the reply. Pure logic.

Handlers are injected (the daemon provides activate/rollback/reboot); built-in ``ping`` needs
nothing. Every refusal and every accepted command goes to the audit sink.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgert.errors import EdgertError
from edgert.mqtt.signing import (
    MAX_COMMAND_BYTES,
    CommandRejected,
    NonceCache,
    NonceStore,
    SignedCommand,
    verify_command,
)

__all__ = ["COMMANDS", "MAX_REPLY_BYTES", "AuditSink", "CommandProcessor", "Handler"]

log = logging.getLogger("edgert.device.commands")

COMMANDS = (
    "ping",
    "get-status",
    "get-config",
    "set-telemetry-interval",
    "activate-model",
    "rollback-model",
    "collect-logs",
    "reboot-daemon",
)
#: Refused commands are logged once per reason per this many seconds, with a count of the rest.
REFUSAL_LOG_INTERVAL_S = 60.0
#: Replies stay well under AWS IoT Core's 128 KB message limit.
MAX_REPLY_BYTES = 96 * 1024
REPLY_VERSION = 1

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]
AuditSink = Callable[..., None]


def _no_audit(event: str, **fields: Any) -> None:
    pass


@dataclass
class CommandProcessor:
    """Turns command payloads into reply payloads for one device."""

    fleet: str
    device: str
    public_key: Ed25519PublicKey | None
    handlers: dict[str, Handler] = field(default_factory=dict)
    audit: AuditSink = _no_audit
    nonces: NonceStore = field(default_factory=NonceCache)
    clock: Callable[[], float] = time.monotonic
    #: reason -> (start of its log window, refusals not logged in it)
    _refusal_log: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.handlers.setdefault("ping", lambda args: {"pong": True, "echo": str(args.get("echo", ""))[:256]})
        unknown = set(self.handlers) - set(COMMANDS)
        if unknown:
            raise ValueError(f"unknown command handler(s): {sorted(unknown)}")

    def _log_refusal(self, reason: str) -> None:
        """One log line per reason and :data:`REFUSAL_LOG_INTERVAL_S`, then a count (a flood must not
        flood the journal or the log tail that ``collect-logs`` returns)."""
        now = self.clock()
        start, suppressed = self._refusal_log.get(reason, (-REFUSAL_LOG_INTERVAL_S, 0))
        if now - start < REFUSAL_LOG_INTERVAL_S:
            self._refusal_log[reason] = (start, suppressed + 1)
            return
        extra: dict[str, Any] = {"reason": reason}
        if suppressed:
            extra["suppressed"] = suppressed  # refusals with this reason not logged in the last window
        log.warning("command refused", extra=extra)
        self._refusal_log[reason] = (now, 0)

    def handle(self, payload: bytes, *, now: float, request_id: str | None = None) -> dict[str, Any]:
        """Process one command payload and return the reply document (never raises)."""
        try:
            command = self._verify(payload, now)
        except CommandRejected as exc:
            self.audit("mqtt.command.refused", reason=exc.code, bytes=len(payload))
            self._log_refusal(exc.code)
            return self._reply(request_id, ok=False, code=exc.code, message=exc.message)
        rid = command.request_id or request_id
        self.audit("mqtt.command.accepted", cmd=command.cmd, nonce=command.nonce)
        return self._dispatch(command, rid)

    def busy_reply(self, payload: bytes, message: str) -> dict[str, Any]:
        """The ``busy`` reply for a command the device cannot take now; it is neither verified nor run.

        The ``request_id`` is read from the *unverified* body, only so that an MQTT 3.1.1 fleet can
        correlate the reply (MQTT 5 uses the correlation data); nothing else in the payload is used.
        Cheap and never raises: it runs on the network thread.
        """
        return self._reply(_unverified_request_id(payload), ok=False, code="busy", message=message)

    def _verify(self, payload: bytes, now: float) -> SignedCommand:
        if self.public_key is None:
            raise CommandRejected("no_key", "device has no pinned fleet command key; commands are disabled")
        return verify_command(
            payload, self.public_key, fleet=self.fleet, device=self.device, now=now, nonces=self.nonces
        )

    def _dispatch(self, command: SignedCommand, rid: str | None) -> dict[str, Any]:
        handler = self.handlers.get(command.cmd)
        if handler is None:
            code = "unknown_command" if command.cmd not in COMMANDS else "unsupported"
            return self._reply(
                rid,
                ok=False,
                code=code,
                message=f"command {command.cmd!r} is not available here",
                cmd=command.cmd,
            )
        try:
            result = dict(handler(command.args))
        except EdgertError as exc:
            self.audit("mqtt.command.failed", cmd=command.cmd, error=exc.message)
            return self._reply(rid, ok=False, code="failed", message=exc.message, cmd=command.cmd)
        except (ValueError, TypeError, KeyError) as exc:
            return self._reply(rid, ok=False, code="bad_args", message=str(exc)[:500], cmd=command.cmd)
        except Exception as exc:
            log.exception("command handler crashed", extra={"cmd": command.cmd})
            return self._reply(rid, ok=False, code="internal", message=type(exc).__name__, cmd=command.cmd)
        return self._reply(rid, ok=True, result=result, cmd=command.cmd)

    def _reply(
        self,
        rid: str | None,
        *,
        ok: bool,
        code: str | None = None,
        message: str | None = None,
        result: Mapping[str, Any] | None = None,
        cmd: str | None = None,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": REPLY_VERSION, "device": self.device, "ok": ok}
        if rid is not None:
            doc["request_id"] = rid
        if cmd is not None:
            doc["cmd"] = cmd
        if ok:
            doc["result"] = result or {}
        else:
            doc["error"] = {"code": code, "message": message}
        if len(json.dumps(doc, default=str)) > MAX_REPLY_BYTES:
            doc.pop("result", None)
            doc["ok"] = False
            doc["error"] = {"code": "too_large", "message": f"result exceeds {MAX_REPLY_BYTES} bytes"}
        return doc


def _unverified_request_id(payload: bytes) -> str | None:
    """``request_id`` from a command's signed body without checking the signature, or None."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        env = json.loads(payload)
        body = json.loads(env["body"]) if isinstance(env, dict) and isinstance(env.get("body"), str) else None
    except Exception:  # invalid JSON, bad UTF-8, nesting too deep: no id to echo
        return None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else None
