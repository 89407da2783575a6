"""The repository transport end to end: python-tuf's Updater refreshes and downloads a real package over a
real mosquitto through MqttFetcher and RepoServer; tampering, outages and lost chunks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError, LengthOrHashMismatchError
from tuf.ngclient import Updater

from edgert.device.repo_fetcher import RepoTimeoutError
from edgert.mqtt.repo_protocol import decode_request
from edgert.security.keys import DeviceKeys
from tests.brokers import Mosquitto
from tests.fleet.test_transport_kit import (
    Controller,
    DeviceLink,
    TufRepo,
    fleet_broker,  # noqa: F401 - fixture
    package_bytes,
)
from tests.security.kit import MODELS

pytestmark = pytest.mark.integration
TARGET = "models/digits/2.edgepkg"


def make_updater(tmp: Path, repo: TufRepo, dev: DeviceLink, **fetcher_kwargs: object) -> Updater:
    return Updater(str(tmp / "tuf" / "metadata"), "mqtt:metadata/", str(tmp / "tuf" / "downloads"),
                   "mqtt:targets/", fetcher=dev.fetcher(tmp / "tuf" / "partial", **fetcher_kwargs),
                   bootstrap=repo.root_bytes)


@pytest.fixture
def setup(tmp_path: Path, fleet_broker: Mosquitto):  # noqa: F811
    (tmp_path / "tuf" / "metadata").mkdir(parents=True)
    repo = TufRepo(tmp_path / "repo")
    keys = DeviceKeys.generate()
    pkg = package_bytes([keys], MODELS / "digits_large_int8.onnx")
    repo.add_target(TARGET, pkg, custom={"edgert": {"name": "digits", "version": "2"}})
    ctl = Controller(fleet_broker.port, repo.dir)
    dev = DeviceLink(fleet_broker.port)
    yield tmp_path, repo, pkg, ctl, dev
    dev.close()
    ctl.close()


def test_updater_refreshes_and_downloads_a_package_over_mqtt(setup) -> None:
    tmp, repo, pkg, ctl, dev = setup
    up = make_updater(tmp, repo, dev)
    up.refresh()
    info = up.get_targetinfo(TARGET)
    assert info is not None and info.length == len(pkg)
    assert info.custom == {"edgert": {"name": "digits", "version": "2"}}
    path = up.download_target(info)
    assert Path(path).read_bytes() == pkg
    assert ctl.server.counters["bytes"] >= len(pkg) and len(pkg) > 65536  # several chunks
    assert not list((tmp / "tuf" / "partial").glob("*.part")), "a finished download leaves no partial"


def test_a_tampered_target_is_refused(setup) -> None:
    tmp, repo, _pkg, _ctl, dev = setup
    up = make_updater(tmp, repo, dev)
    info = up.get_targetinfo(TARGET)
    assert info is not None
    served = next((repo.dir / "targets" / "models" / "digits").glob("*.2.edgepkg"))
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same length: only the hash can tell
    served.write_bytes(bytes(data))
    with pytest.raises(LengthOrHashMismatchError):
        up.download_target(info)
    assert not (tmp / "tuf" / "downloads").exists() or not list((tmp / "tuf" / "downloads").iterdir())
    assert not list((tmp / "tuf" / "partial").glob("*.part")), "bad bytes are never resumed from"


def test_a_missing_file_is_404_for_tuf(setup) -> None:
    _tmp, _repo, _pkg, _ctl, dev = setup
    fetcher = dev.fetcher()
    with pytest.raises(DownloadHTTPError) as info:
        fetcher.download_bytes("mqtt:metadata/99.root.json", 1000)
    assert info.value.status_code == 404


def test_broker_down_mid_download_resumes(tmp_path: Path, setup, fleet_broker: Mosquitto) -> None:  # noqa: F811
    tmp, repo, pkg, ctl, dev = setup
    dev.requester.timeout_s, dev.requester.attempts = 2.0, 15
    restarted = threading.Event()

    def outage(path: str, offset: int, total: int) -> None:
        # Called on the fetching thread after each chunk: take the broker down once, a third of the way in.
        if path.startswith("targets/") and offset >= total // 3 and not restarted.is_set():
            restarted.set()
            fleet_broker.stop()
            threading.Timer(1.0, fleet_broker.start).start()

    up = make_updater(tmp, repo, dev, chunk_size=8192, on_progress=outage)
    info = up.get_targetinfo(TARGET)
    assert info is not None
    before = ctl.server.counters["bytes"]
    path = up.download_target(info)
    assert restarted.is_set() and dev.link.connects >= 2, "the broker really went down mid-download"
    assert Path(path).read_bytes() == pkg
    served = ctl.server.counters["bytes"] - before
    # Resumed, not restarted: at most a few chunks are sent twice.
    assert served <= len(pkg) + 4 * 8192, (served, len(pkg))


def test_a_download_resumes_across_restarts_from_its_partial_file(setup) -> None:
    tmp, repo, pkg, ctl, dev = setup
    dev.requester.timeout_s, dev.requester.attempts = 0.5, 2
    up = make_updater(tmp, repo, dev, chunk_size=8192)
    info = up.get_targetinfo(TARGET)
    assert info is not None
    cut = len(pkg) // 2
    ctl.drop = lambda topic, payload: False
    real = ctl.server.answer

    def answer_first_half(device: str, payload: bytes):  # the controller stops answering mid-file
        return None if decode_request(payload).offset >= cut else real(device, payload)

    ctl.server.answer = answer_first_half  # type: ignore[method-assign]
    with pytest.raises(RepoTimeoutError):
        up.download_target(info)
    (part,) = (tmp / "tuf" / "partial").glob("*.part")
    have = part.stat().st_size
    assert 0 < have <= cut + 8192
    ctl.server.answer = real  # type: ignore[method-assign]
    up2 = make_updater(tmp, repo, dev, chunk_size=8192)  # a new process: only the files remain
    info2 = up2.get_targetinfo(TARGET)
    assert info2 is not None
    before = ctl.server.counters["bytes"]
    path = up2.download_target(info2)
    assert Path(path).read_bytes() == pkg
    assert ctl.server.counters["bytes"] - before == len(pkg) - have


def test_a_chunk_that_never_arrives_times_out_clearly(setup) -> None:
    tmp, repo, _pkg, ctl, dev = setup
    dev.requester.timeout_s, dev.requester.attempts = 0.3, 3
    up = make_updater(tmp, repo, dev, chunk_size=8192)
    info = up.get_targetinfo(TARGET)
    assert info is not None
    lost = 3 * 8192
    real = ctl.server.answer
    ctl.server.answer = (  # type: ignore[method-assign]
        lambda device, payload: None if decode_request(payload).offset == lost else real(device, payload))
    with pytest.raises(RepoTimeoutError) as err:
        up.download_target(info)
    text = str(err.value)
    assert f"offset {lost}" in text and "after 3 attempts" in text and "edgert fleet serve" in text
    assert dev.requester.counters["retries"] >= 2
