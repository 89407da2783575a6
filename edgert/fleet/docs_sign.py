"""Desired-state documents (FLEET_CONTRACT): build, sign with the fleet command key, verify. Pure.

The signature is Ed25519 over the canonical JSON of every field but ``"sig"``:
``json.dumps(doc_without_sig, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False).encode("ascii")``. ASCII-only output keeps the bytes independent of how a verifier
prints Unicode. ``issued`` is whole unix seconds, so no float formatting is involved in it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgert.errors import SignatureError
from edgert.mqtt.repo_protocol import desired_signed_bytes, sign_desired_state, verify_desired_signature

__all__ = [
    "DOC_VERSION",
    "MAX_DOC_BYTES",
    "canonical_bytes",
    "desired_state",
    "encode",
    "sign_document",
    "target_path",
    "verify_document",
]

DOC_VERSION = 1
MAX_DOC_BYTES = 16 * 1024


def target_path(model: str, version: str) -> str:
    """TUF target path of a model version: ``models/<name>/<version>.edgepkg``."""
    return f"models/{model}/{version}.edgepkg"


def desired_state(
    *,
    fleet: str,
    seq: int,
    rollout: str,
    model: str,
    version: str,
    issued: int,
    shadow_percent: float | None = None,
    wave: int | None = None,
) -> dict[str, Any]:
    """An unsigned desired-state document (group deployment, or a device assignment with ``wave``)."""
    doc: dict[str, Any] = {
        "v": DOC_VERSION, "fleet": fleet, "seq": int(seq), "rollout": rollout, "model": model,
        "version": version, "target": target_path(model, version),
        "shadow": None if shadow_percent is None else {"percent": float(shadow_percent)},
        "issued": int(issued),
    }
    if wave is not None:
        doc["wave"] = int(wave)
    return doc


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """The signed bytes: the one definition both sides use (``repo_protocol.desired_signed_bytes``)."""
    return desired_signed_bytes(doc)


def sign_document(doc: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``doc`` with ``sig`` (what devices verify with ``verify_desired_signature``)."""
    return sign_desired_state(doc, key)


def encode(doc: Mapping[str, Any]) -> bytes:
    """Wire bytes of a signed document (compact JSON)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def verify_document(payload: bytes | Mapping[str, Any], key: Ed25519PublicKey) -> dict[str, Any]:
    """Parse and verify a signed document; raise SignatureError (opaque) on anything wrong."""
    try:
        if isinstance(payload, (bytes, bytearray)):
            if len(payload) > MAX_DOC_BYTES:
                raise ValueError("too large")
            doc = json.loads(payload)
        else:
            doc = dict(payload)
        if not isinstance(doc, dict) or doc.get("v") != DOC_VERSION or not isinstance(doc.get("sig"), str):
            raise ValueError("shape")
        verify_desired_signature(doc, key)
    except (ValueError, TypeError, RecursionError, SignatureError):
        raise SignatureError("desired-state document is not validly signed by the fleet command key",
                             hint="check that the device pins the fleet's command public key") from None
    return doc
