"""`edgert config example` prints the annotated example config, and the example names real profiles."""

from __future__ import annotations

import re
from pathlib import Path

from edgert.profiles import available_profiles


def test_config_example_prints_the_shipped_file(edgert_cli, repo_root: Path) -> None:
    r = edgert_cli("config", "example")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (repo_root / "packaging" / "edgert.toml").read_text()
    where = edgert_cli("config", "example", "--path")
    assert where.returncode == 0 and Path(where.stdout.strip()).read_text() == r.stdout


def test_example_names_only_profiles_that_exist(repo_root: Path) -> None:
    """The `profile =` line and its comment (issue 9 #18: it named a raspberry-pi-5 that does not exist)."""
    lines = [ln for ln in (repo_root / "packaging" / "edgert.toml").read_text().splitlines()
             if ln.startswith("profile =")]  # fmt: skip
    assert len(lines) == 1
    named = re.findall(r'"([^"]+)"', lines[0])
    assert named and named[0] == "auto"
    assert set(named) - {"auto"} <= set(available_profiles()), named
