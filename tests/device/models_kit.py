"""Real ONNX models that load but fail, built from the sample models (for Deployer failure paths)."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def fails_at_run(out: Path, base: str = "digits_small_int8.onnx") -> Path:
    """``base`` with its ``logits`` reshaped to [7, -1]: it loads, then every run fails (10 % 7 != 0).

    Same inputs and outputs by name and dtype as ``base``, so a swap to it passes the signature check
    and fails exactly at warm-up, like a model built for the wrong hardware or opset.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(MODELS / base))
    graph = model.graph
    (output,) = [o for o in graph.output if o.name == "logits"]
    for node in graph.node:
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array([7, -1], dtype=np.int64), "bad_shape"))
    graph.node.append(helper.make_node("Reshape", ["logits_raw", "bad_shape"], ["logits"]))
    output.type.tensor_type.ClearField("shape")
    onnx.save(model, str(out))
    return out


def flip_payload_byte(path: Path) -> None:
    """Damage an installed package on disk (one payload bit, as a bad flash block would)."""
    from edgert.security.package import read_header

    with open(path, "r+b") as f:
        offset = read_header(f).payload_offset + 100
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
