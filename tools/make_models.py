"""Build edgert's sample models reproducibly: digits CNNs (fp32/int8 ONNX, int8 .tflite) and MobileNetV2.

Needs the ``models`` extra (torch, scikit-learn, onnx, onnxscript, tensorflow-cpu). Usage::

    python tools/make_models.py                  # everything that is committed under models/
    python tools/make_models.py --mobilenet-fp32 # models/generated/mobilenetv2_fp32.onnx (git-ignored)
    python tools/make_models.py --all            # both
    python tools/make_models.py --check          # rebuild into a temp dir, compare with models/
    python tools/make_models.py --tones          # only the tone-burst stream models (torch, onnx)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, tools/ is already on sys.path; imported by file path (importlib), it may not be.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# Re-exported so callers that import this script keep working; the code lives in tools/modelkit/.
from modelkit.build import build_committed, build_tones_only, check_reproduces, write_fp32_mobilenet
from modelkit.cards import render_readme, tool_versions
from modelkit.common import (
    CARDS,
    COMMAND,
    GENERATED_DIR,
    MAX_COMMITTED_BYTES,
    MOBILENET_FP32,
    MOBILENET_INT8,
    MODELS_DIR,
    ROOT,
    SEED,
    TEST_SET,
    digits_split,
    sha256,
    write_atomic,
)
from modelkit.convert import (
    export_onnx,
    ort_run,
    quantize_qdq,
    rename_signature_outputs,
    tflite_run,
    to_keras,
    to_tflite_int8,
)
from modelkit.digits import LARGE, SMALL, DigitsSpec, build_digits, train_digits
from modelkit.mobilenet import build_mobilenetv2, mobilenet_fp32, mobilenet_inputs

__all__ = [
    "CARDS",
    "COMMAND",
    "GENERATED_DIR",
    "LARGE",
    "MAX_COMMITTED_BYTES",
    "MOBILENET_FP32",
    "MOBILENET_INT8",
    "MODELS_DIR",
    "ROOT",
    "SEED",
    "SMALL",
    "TEST_SET",
    "DigitsSpec",
    "build_committed",
    "build_digits",
    "build_mobilenetv2",
    "check_reproduces",
    "digits_split",
    "export_onnx",
    "main",
    "mobilenet_fp32",
    "mobilenet_inputs",
    "ort_run",
    "quantize_qdq",
    "rename_signature_outputs",
    "render_readme",
    "sha256",
    "tflite_run",
    "to_keras",
    "to_tflite_int8",
    "tool_versions",
    "train_digits",
    "write_atomic",
    "write_fp32_mobilenet",
]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mobilenet-fp32", action="store_true", help=f"only write models/generated/{MOBILENET_FP32}"
    )
    ap.add_argument("--all", action="store_true", help="committed models and the generated fp32 MobileNetV2")
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with models/")
    ap.add_argument("--tones", action="store_true", help="only the tone-burst models (needs torch, not TF)")
    args = ap.parse_args(argv)
    if args.tones:  # the streaming sample: torch + onnx only, merged into the committed cards
        for name, card in build_tones_only(MODELS_DIR)["models"].items():
            if card["family"] == "tones":
                print(f"{name:32} {card['size_bytes']:>10,} B  acc {card['accuracy_pct']}")
        return 0
    try:
        if args.check or args.all or not args.mobilenet_fp32:  # the fp32 MobileNetV2 alone needs only torch
            import tensorflow  # noqa: F401  (fail early, before minutes of training)
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc.name} is not installed\nhint: pip install -e '.[models]'", file=sys.stderr)
        return 2
    if args.check:
        return check_reproduces()
    if not args.mobilenet_fp32:
        cards = build_committed(MODELS_DIR)
        for name, card in cards["models"].items():
            if card["committed"] and card["size_bytes"] > MAX_COMMITTED_BYTES:
                print(
                    f"warning: {name} is {card['size_bytes']} bytes, over the 5 MB commit limit",
                    file=sys.stderr,
                )
            print(f"{name:32} {card['size_bytes']:>10,} B  acc {card.get('accuracy_pct', '-')}")
    if args.mobilenet_fp32 or args.all:  # after the cards, so the sha256 comparison is against this build
        write_fp32_mobilenet()
    return 0


if __name__ == "__main__":
    sys.exit(main())
