"""``edgert demo``: the real daemon on an embedded default config.

The bundled sample models are encrypted to a fresh device key and installed into a temporary store,
exactly as a fleet deployment would install them, so the demo exercises the encrypted path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgert.config import CascadeEntry, DaemonConfig, HttpConfig, MetricsConfig, ModelEntry, SocketConfig

__all__ = ["DEMO_MODELS", "DemoModel", "build_demo_config", "demo_usage", "install_demo_store"]


@dataclass(frozen=True)
class DemoModel:
    """A bundled sample model served by the demo."""

    name: str
    filename: str
    variant: str


DEMO_MODELS = (
    DemoModel("digits-small", "digits_small_int8.onnx", "int8"),
    DemoModel("digits-large", "digits_large_int8.onnx", "int8"),
    DemoModel("tones", "tones_int8.onnx", "int8"),  # the streaming sample (docs/streams.md)
)
MOBILENET = DemoModel("mobilenetv2", "mobilenetv2_int8.onnx", "int8")
#: Name of the cascade of the two digits models.
CASCADE_NAME = "digits"


def install_demo_store(root: Path, models: Sequence[DemoModel], version: str = "1") -> None:
    """Create a fresh device key under ``root`` and import each sample model encrypted to it."""
    from edgert._resources import sample_model
    from edgert.device.importing import import_plaintext
    from edgert.errors import ModelError
    from edgert.security.loader import open_audit, open_keystore, open_store

    keys = open_keystore(root, create=True)
    with open_audit(root, keys) as audit:
        store = open_store(root, keys, audit)
        for m in models:
            src = sample_model(m.filename)
            if not src.is_file():
                raise ModelError(
                    f"bundled sample model {m.filename} is missing (looked in {src.parent})",
                    hint="reinstall edgert, or run from a source checkout with models/",
                )
            import_plaintext(store, src, name=m.name, version=version, variant=m.variant)


def build_demo_config(
    root: Path,
    *,
    http: str = "127.0.0.1:8000",
    socket: str | None = None,
    metrics: str = "127.0.0.1:0",
    mobilenet: bool = False,
) -> DaemonConfig:
    """The embedded demo config: CPU profile, store under ``root``, no broker."""
    from edgert.engine import DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD

    # The digits models run in ~20 µs: a second intra-op thread only spins and steals the core the
    # event loop needs (measured in docs/serving.md), so they get one thread.
    models = [ModelEntry(name=m.name, threads=1) for m in DEMO_MODELS]
    if mobilenet:
        models.append(ModelEntry(name=MOBILENET.name))
    return DaemonConfig(
        source="<edgert demo>",
        profile="cpu-generic",
        state_dir=str(root),
        http=HttpConfig(listen=http),
        socket=SocketConfig(path=socket if socket is not None else str(root / "edgert.sock"), mode=0o600),
        metrics=MetricsConfig(listen=metrics),
        models=tuple(models),
        cascades=(
            CascadeEntry(
                CASCADE_NAME, "digits-small", "digits-large", DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD
            ),
        ),
    )


def demo_usage(http: str, socket: str, metrics: str) -> str:
    """How to call the running demo (printed on start)."""
    row = (
        "[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,"
        "0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]"
    )
    return f"""edgert demo is serving (Ctrl-C to stop)
  OIP v2 HTTP   http://{http}      models: digits (cascade), digits-small, digits-large, tones
  Unix socket   {socket}
  Prometheus    http://{metrics}/metrics

curl:
  curl -s http://{http}/v2/models/digits
  curl -s -H 'Content-Type: application/json' http://{http}/v2/models/digits/infer \\
    -d '{{"id":"1","inputs":[{{"name":"pixels","datatype":"FP32","shape":[1,64],"data":{row}}}]}}'

Python:
  import numpy as np
  from edgert.client import Client
  with Client("unix://{socket}") as c:        # or Client("http://{http}")
      logits = c.infer("digits", {{"pixels": np.zeros((1, 64), np.float32)}})["logits"]
      print(logits.argmax(1))

Stream (tone-burst detector, 10 ms chunks of 16 kHz audio, a result every 100 ms; docs/streams.md):
  chunks = (np.zeros((1, 160), np.float32) for _ in range(300))
  with Client("unix://{socket}") as c:
      for r in c.stream("tones", chunks, window=16000, hop=1600, policy="latest"):
          print(r.id, r.outputs["logits"].argmax(1), r.dropped, r.lag_ms)
  WebSocket: ws://{http}/v2/models/tones/stream
"""
