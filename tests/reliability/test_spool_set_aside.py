"""Copies of a corrupt spool set aside for inspection are bounded (issue 9, C6).

Each rebuild used to keep a full ``telemetry.sqlite.corrupt-*`` copy forever: on a 4 MB state disk two
events filled the disk and every later reading was dropped. Copies are now bounded in count and in bytes
(also relative to the size of the file system) and the oldest are pruned.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.mqtt.spool import MAX_CORRUPT_COPIES, MAX_CORRUPT_DISK_FRACTION, Spool

pytestmark = pytest.mark.integration

DISK_BYTES = 4 * 1024 * 1024
#: One telemetry reading of a device with a few models (about 2 KB).
READING = json.dumps({"v": 1, "models": {f"m{i}": {"p50": 0.001 * i, "pad": "x" * 150} for i in range(10)}})


def _corrupt(path: Path) -> None:
    """Overwrite the SQLite header, as a torn write or a bad flash block would."""
    with open(path, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 8)


def _aside(directory: Path, name: str) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(f"{name}.corrupt-"))


def _fill(path: Path, n: int, **kwargs: object) -> None:
    spool = Spool(path, 100_000, **kwargs)  # type: ignore[arg-type]
    for i in range(n):
        spool.enqueue("t", READING.encode(), float(i))
    spool.close()


def test_corrupt_copies_are_pruned_to_the_count_bound(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.sqlite"
    rebuilds = MAX_CORRUPT_COPIES + 3
    for _ in range(rebuilds):
        _fill(path, 20)
        _corrupt(path)
        spool = Spool(path, 100)
        assert spool.stats()["rebuilds"] >= 1
        spool.close()
    copies = {p.name.removesuffix("-wal").removesuffix("-shm") for p in _aside(tmp_path, path.name)}
    assert len(copies) == MAX_CORRUPT_COPIES, sorted(copies)


def test_corrupt_copies_are_pruned_to_the_byte_bound_newest_kept(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.sqlite"
    _fill(tmp_path / "measure.sqlite", 50)
    one_copy = (tmp_path / "measure.sqlite").stat().st_size
    cap = one_copy + one_copy // 2  # room for one copy, not two
    for round_ in range(3):
        _fill(path, 50)
        _corrupt(path)
        Spool(path, 100, max_corrupt_bytes=cap).close()
        kept = _aside(tmp_path, path.name)
        assert sum(p.stat().st_size for p in kept) <= cap
        assert len({p.name.removesuffix("-wal").removesuffix("-shm") for p in kept}) == 1, round_
    # A copy bigger than the byte bound on its own is not kept at all.
    _fill(path, 50)
    _corrupt(path)
    Spool(path, 100, max_corrupt_bytes=one_copy // 2).close()
    assert _aside(tmp_path, path.name) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB file system (tmpfs); skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 4 MB tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 4 MB tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_two_corruptions_on_a_4mb_state_disk_do_not_starve_later_readings(small_disk: Path) -> None:
    path = small_disk / "spool" / "telemetry.sqlite"
    backlog = 600  # about 1.3 MB: a day offline
    for _ in range(2):
        _fill(path, backlog)
        _corrupt(path)
        Spool(path, 100_000).close()
    aside = sum(p.stat().st_size for p in _aside(path.parent, path.name))
    assert aside <= MAX_CORRUPT_DISK_FRACTION * DISK_BYTES, f"{aside} bytes of copies on a 4 MB disk"
    spool = Spool(path, 100_000)
    later = [spool.enqueue("t", READING.encode(), float(i)) for i in range(backlog)]
    stats = spool.stats()
    spool.close()
    assert stats["dropped_disk_full"] == 0 and all(isinstance(i, int) for i in later), stats
