"""Issue 9 item 21: one bad profile file must not take `edgert doctor` and `edgert profiles list` down.

The bad file is reported (file name, key, what is wrong) and every other profile is still listed,
detected and loadable. The CLI runs for real in a subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgert.errors import ConfigError
from edgert.profiles import available_profiles, load_profile, scan_profiles

#: A profile with a value the schema refuses: the key is runtime.threads.
BAD_VALUE = 'schema = 1\nname = "bad-threads"\n[runtime]\nthreads = -1\n'
#: A file that is not TOML at all (unterminated string).
BAD_TOML = 'schema = 1\nname = "broken\n'
GOOD = 'schema = 1\nname = "mine"\ndescription = "my board"\n[runtime]\nthreads = 1\n'


def bad_value_line(profile_dir: Path) -> re.Pattern[str]:
    """The report of BAD_VALUE: its file, its key, the bound and the value it got."""
    where = re.escape(f"{profile_dir / 'a-bad-value.toml'}: runtime.threads: must be ")
    return re.compile(where + r".*>= 0.*-1")


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An extra profile directory with one good and two bad files, on $EDGERT_PROFILE_DIR."""
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "a-bad-value.toml").write_text(BAD_VALUE)
    (d / "b-broken.toml").write_text(BAD_TOML)
    (d / "mine.toml").write_text(GOOD)
    monkeypatch.setenv("EDGERT_PROFILE_DIR", str(d))
    return d


def test_scan_reports_each_bad_file_and_keeps_the_good_ones(profile_dir: Path) -> None:
    found, problems = scan_profiles()
    assert {"cpu-generic", "jetson-orin", "mine"} <= set(found)
    by_file = {Path(p.path).name: p for p in problems}
    assert set(by_file) == {"a-bad-value.toml", "b-broken.toml"}
    # The error names the file, the key and what is wrong.
    bad = by_file["a-bad-value.toml"]
    assert bad.path == str(profile_dir / "a-bad-value.toml")
    assert len(bad.lines()) == 1
    assert bad_value_line(profile_dir).fullmatch(bad.lines()[0]), bad.lines()
    assert by_file["b-broken.toml"].lines()[0].startswith(f"{profile_dir / 'b-broken.toml'}: not valid TOML")


def test_runtime_lookups_survive_a_bad_sibling(profile_dir: Path) -> None:
    assert "mine" in available_profiles()
    assert load_profile("cpu-generic").name == "cpu-generic"
    assert load_profile("mine").threads == 1
    # Asking for a profile that only a broken file could have defined names the broken files.
    with pytest.raises(ConfigError) as err:
        load_profile("bad-threads")
    assert "unknown device profile 'bad-threads'" in err.value.message
    assert "a-bad-value.toml" in (err.value.hint or "") and "runtime.threads" in (err.value.hint or "")


def test_profiles_list_reports_the_bad_file_and_lists_the_rest(profile_dir: Path, edgert_cli) -> None:
    r = edgert_cli("profiles", "list")
    assert r.returncode == 0, r.stderr
    names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert {"cpu-generic", "jetson-orin", "coral-edgetpu", "mine"} <= names
    assert "Traceback" not in r.stderr
    assert bad_value_line(profile_dir).search(r.stderr), r.stderr
    assert f"{profile_dir / 'b-broken.toml'}: not valid TOML" in r.stderr

    j = edgert_cli("profiles", "list", "--json")
    assert j.returncode == 0, j.stderr
    listed = {p["name"] for p in json.loads(j.stdout)}
    assert {"cpu-generic", "mine"} <= listed
    assert "a-bad-value.toml" in j.stderr


def test_doctor_reports_the_bad_file_and_still_detects(profile_dir: Path, edgert_cli) -> None:
    r = edgert_cli("doctor")
    assert r.returncode == 0, r.stderr
    assert "detected profile: cpu-generic" in r.stdout
    assert "mine" in r.stdout
    assert bad_value_line(profile_dir).search(r.stdout), r.stdout
    assert f"{profile_dir / 'b-broken.toml'}: not valid TOML" in r.stdout

    j = edgert_cli("doctor", "--json")
    assert j.returncode == 0, j.stderr
    doc = json.loads(j.stdout)
    assert doc["profile"] == "cpu-generic"
    assert "mine" in {p["name"] for p in doc["profiles"]}
    errors = {Path(e["path"]).name: e["error"] for e in doc["profile_errors"]}
    assert set(errors) == {"a-bad-value.toml", "b-broken.toml"}
    assert bad_value_line(profile_dir).search(errors["a-bad-value.toml"])
    assert "b-broken.toml: not valid TOML" in errors["b-broken.toml"]
