"""The import rules of docs/architecture.md, checked on the real source tree (lazy imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgert"
EDGERT_ALL = ("edgert.",)

#: package (path prefix under edgert/) -> forbidden import prefixes. Mirrors docs/architecture.md.
RULES: dict[str, tuple[str, ...]] = {
    "errors.py": EDGERT_ALL,
    "paths.py": EDGERT_ALL,
    "logs.py": EDGERT_ALL,
    "security/": ("edgert.runtime", "edgert.backends", "edgert.engine", "edgert.serve", "edgert.mqtt",
                  "edgert.device", "edgert.cli", "edgert.client", "onnxruntime", "ai_edge_litert",
                  "tflite_runtime"),
    "engine/": ("edgert.serve", "edgert.mqtt", "edgert.device", "edgert.cli", "edgert.client"),
    "serve/": ("edgert.device", "edgert.mqtt", "edgert.cli", "edgert.client"),
    "mqtt/": ("edgert.device", "edgert.serve", "edgert.engine", "edgert.cli", "edgert.client"),
    "client/": ("edgert.device", "edgert.engine", "edgert.mqtt", "edgert.cli"),
    "fleet/": ("edgert.device",),
    "provision/": ("edgert.serve",),
    "drift/": ("edgert.engine", "edgert.serve", "edgert.mqtt", "edgert.device", "edgert.cli", "edgert.client",
               "edgert.security"),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        forbidden = [p for prefix, rule in RULES.items() if rel == prefix or rel.startswith(prefix)
                     for p in rule]
        if not rel.startswith("cli/"):
            forbidden.append("click")
        for line, module in imports_of(path):
            for bad in forbidden:
                if module == bad.rstrip(".") or module.startswith(bad if bad.endswith(".") else bad + "."):
                    out.append(f"edgert/{rel}:{line} imports {module}")
                elif bad == "click" and module == "click":
                    out.append(f"edgert/{rel}:{line} imports click")
    return out


def test_import_rules_hold() -> None:
    assert violations() == []


def test_the_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "edgert" / "security"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    import onnxruntime\n    from edgert.device import daemon\n")
    (tmp_path / "edgert" / "engine").mkdir()
    (tmp_path / "edgert" / "engine" / "x.py").write_text("import click\nfrom edgert.serve.port import A\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path / "edgert")
    found = violations()
    assert "edgert/security/bad.py:2 imports onnxruntime" in found
    assert "edgert/security/bad.py:3 imports edgert.device" in found
    assert "edgert/engine/x.py:1 imports click" in found
    assert "edgert/engine/x.py:2 imports edgert.serve.port" in found
