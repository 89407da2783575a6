"""Whole builds: every committed file, the reproducibility check, and the git-ignored fp32 MobileNetV2."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .cards import render_readme, tool_versions
from .common import (
    CARDS,
    COMMAND,
    GENERATED_DIR,
    MOBILENET_FP32,
    MODELS_DIR,
    SEED,
    TEST_FRACTION,
    TEST_SET,
    digits_split,
    save_test_set,
    sha256,
    write_atomic,
)
from .digits import LARGE, SMALL, build_digits_family, cascade_table
from .mobilenet import build_mobilenet, mobilenet_fp32
from .tones import build_tones


def build_committed(out: Path) -> dict[str, Any]:
    """Build every committed file into out (models, test split, cards.json, README.md); returns the cards."""
    data = digits_split()
    save_test_set(out / TEST_SET, data[2], data[3])
    models: dict[str, Any] = {}
    logits: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in (SMALL, LARGE):
            cards, lg = build_digits_family(spec, data, out, Path(tmp))
            models.update(cards)
            logits.update(lg)
        models.update(build_mobilenet(out, Path(tmp), None))
        models.update(build_tones(out, Path(tmp)))
    macs_s, macs_l = (
        models["digits_small_fp32.onnx"]["macs_per_sample"],
        models["digits_large_fp32.onnx"]["macs_per_sample"],
    )
    cascade = {
        prec: cascade_table(
            logits[f"digits_small_{prec}.onnx"], logits[f"digits_large_{prec}.onnx"], data[3], macs_s, macs_l
        )
        for prec in ("fp32", "int8")
    }
    cards = {
        "schema": 1,
        "generator": COMMAND,
        "seed": SEED,
        "versions": tool_versions(),
        "dataset": {
            "source": "sklearn.datasets.load_digits (bundled, no download)",
            "file": TEST_SET,
            "split": f"train_test_split(test_size={TEST_FRACTION}, random_state={SEED}, stratify=y)",
            "n_train": len(data[0]),
            "n_test": len(data[2]),
            "sha256": sha256((out / TEST_SET).read_bytes()),
        },
        "cascade_on_test_split": cascade,
        "models": models,
    }
    write_atomic(out / CARDS, (json.dumps(cards, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "README.md", render_readme(cards).encode())
    return cards


def build_tones_only(out: Path) -> dict[str, Any]:
    """Rebuild only the tone-burst models and merge their cards into out's cards.json and README.md."""
    cards = json.loads((out / CARDS).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cards["models"].update(build_tones(out, Path(tmp)))
    cards["models"] = dict(sorted(cards["models"].items()))
    write_atomic(out / CARDS, (json.dumps(cards, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "README.md", render_readme(cards).encode())
    return cards


def check_reproduces() -> int:
    """Rebuild into a temp dir and compare with models/; 0 if every accuracy matches (bytes are reported)."""
    committed = json.loads((MODELS_DIR / CARDS).read_text())["models"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build_committed(Path(tmp))["models"]
        for name, card in fresh.items():
            old = committed.get(name)
            if old is None:
                print(f"NEW      {name}: not in committed cards.json")
                failures += 1
                continue
            same_bytes = old["sha256"] == card["sha256"]
            same_acc = old.get("accuracy_pct") == card.get("accuracy_pct")
            failures += not same_acc
            print(
                f"{'OK' if same_acc else 'DIFFERS':8} {name}: "
                f"bytes {'identical' if same_bytes else 'differ'}, "
                f"accuracy {old.get('accuracy_pct', 'n/a')} -> {card.get('accuracy_pct', 'n/a')}"
            )
        same_npz = (MODELS_DIR / TEST_SET).read_bytes() == (Path(tmp) / TEST_SET).read_bytes()
        failures += not same_npz
        print(
            f"{'OK' if same_npz else 'DIFFERS':8} {TEST_SET}: bytes {'identical' if same_npz else 'differ'}"
        )
    print("reproduces" if failures == 0 else f"{failures} difference(s)")
    return 1 if failures else 0


def write_fp32_mobilenet() -> Path:
    """Write the git-ignored fp32 MobileNetV2 and say whether it matches the sha256 in cards.json."""
    fp32, _, _ = mobilenet_fp32()
    path = GENERATED_DIR / MOBILENET_FP32
    write_atomic(path, fp32)
    cards_path = MODELS_DIR / CARDS
    want = (
        json.loads(cards_path.read_text())["models"].get(f"generated/{MOBILENET_FP32}", {}).get("sha256")
        if cards_path.exists()
        else None
    )
    verdict = (
        "matches cards.json" if want == sha256(fp32) else "differs from cards.json (other machine/versions?)"
    )
    print(f"wrote {path} ({len(fp32):,} B), sha256 {verdict}")
    return path
