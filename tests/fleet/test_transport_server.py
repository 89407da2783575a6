"""RepoServer on real files (no broker): it serves the repository in bounded chunks and never anything
outside it; the request/reply codec refuses what it must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.errors import SignatureError
from edgert.mqtt.repo_protocol import (
    MAX_CHUNK,
    RepoProtocolError,
    RepoReply,
    RepoRequest,
    check_repo_path,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    request_device,
    sign_desired_state,
    verify_desired_signature,
)
from edgert.mqtt.repo_server import RepoServer


@pytest.fixture
def tree(tmp_path: Path) -> tuple[RepoServer, list[tuple[str, bytes]]]:
    root = tmp_path / "repository"
    (root / "metadata").mkdir(parents=True)
    (root / "targets" / "models" / "digits").mkdir(parents=True)
    (root / "metadata" / "1.root.json").write_bytes(b'{"root": 1}')
    (root / "targets" / "models" / "digits" / "abc.2.edgepkg").write_bytes(bytes(range(256)) * 600)
    secret = tmp_path / "secret.pem"
    secret.write_bytes(b"PRIVATE KEY")
    (root / "metadata" / "escape.json").symlink_to(secret)
    (root / "targets" / "out").symlink_to(tmp_path)
    (root / "targets" / "inside.json").symlink_to(root / "metadata" / "1.root.json")
    sent: list[tuple[str, bytes]] = []
    records = {("dev-a", "models/digits/2.edgepkg"): b'{"recipient": "x"}'}
    server = RepoServer(root, "f1", lambda t, p: sent.append((t, p)),
                        key_records=lambda device, path: records.get((device, path)))
    return server, sent


def ask(server: RepoServer, path: str, offset: int = 0, length: int = MAX_CHUNK) -> RepoReply:
    payload = json.dumps({"v": 1, "id": "r1", "path": path, "offset": offset, "length": length}).encode()
    reply = server.answer("dev-a", payload)
    assert reply is not None
    return reply


def test_serves_files_in_bounded_chunks(tree) -> None:
    server, sent = tree
    first = ask(server, "targets/models/digits/abc.2.edgepkg")
    assert first.status == "ok" and first.total == 153600 and len(first.data) == MAX_CHUNK
    tail = ask(server, "targets/models/digits/abc.2.edgepkg", offset=153600 - 10, length=100)
    assert tail.data == (bytes(range(256)) * 600)[-10:]
    assert ask(server, "metadata/1.root.json").data == b'{"root": 1}'
    req = encode_request(RepoRequest("i", "metadata/1.root.json", 0, 5))
    assert server.handle_message("edgert/v1/f1/repo/req/dev-a", req)
    ((topic, payload),) = sent
    assert topic == "edgert/v1/f1/devices/dev-a/repo" and decode_reply(payload).data == b'{"roo'
    assert not server.handle_message("edgert/v1/f2/repo/req/dev-a", b"{}"), "another fleet's topic"


@pytest.mark.parametrize("path", [
    "metadata/../../secret.pem", "targets/../metadata/1.root.json", "/etc/passwd", "metadata//x",
    "metadata/", "etc/passwd", "targets/models/./digits", "metadata/a\\b", "metadata/\u00e9", "metadata/a\0b",
])
def test_paths_that_could_leave_the_repository_are_refused(tree, path: str) -> None:
    server, _ = tree
    with pytest.raises(RepoProtocolError):
        check_repo_path(path)
    payload = json.dumps({"v": 1, "id": "r1", "path": path, "offset": 0, "length": 10}).encode()
    assert server.answer("dev-a", payload) is None  # malformed: refused before any file is touched
    assert server.counters["refused"] == 1 and server.counters["bytes"] == 0


@pytest.mark.parametrize("path", ["metadata/escape.json", "targets/out/secret.pem"])
def test_symlinks_out_of_the_repository_are_refused(tree, path: str) -> None:
    server, _ = tree
    reply = ask(server, path)
    assert reply.status == "error" and "outside the repository" in (reply.message or "")
    assert reply.data == b"" and server.counters["refused"] == 1


def test_not_found_directories_and_links_inside(tree) -> None:
    server, _ = tree
    assert ask(server, "metadata/2.root.json").status == "not_found"
    assert ask(server, "targets/models").status == "not_found"  # a directory is not a file
    # A link that stays inside the repository still leaves its own subtree (targets -> metadata): refused.
    assert ask(server, "targets/inside.json").status == "error"
    assert ask(server, "metadata/1.root.json", offset=999).status == "error"


def test_key_records_come_from_the_fleet_callable(tree) -> None:
    server, _ = tree
    assert ask(server, "keys/models/digits/2.edgepkg").data == b'{"recipient": "x"}'
    assert ask(server, "keys/models/digits/3.edgepkg").status == "not_found"


@pytest.mark.parametrize("payload", [
    b"", b"[]", b'{"v":2,"id":"a","path":"metadata/x","offset":0,"length":1}',
    b'{"v":1,"id":"a b","path":"metadata/x","offset":0,"length":1}',
    b'{"v":1,"id":"a","path":"metadata/x","offset":-1,"length":1}',
    b'{"v":1,"id":"a","path":"metadata/x","offset":0,"length":65537}',
    b'{"v":1,"id":"a","path":"metadata/x","offset":true,"length":1}', b"\xff" * 10, b"x" * 5000,
])
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(RepoProtocolError):
        decode_request(payload)


def test_reply_framing_is_checked() -> None:
    good = encode_reply(RepoReply("a", "ok", 5, 10, b"hello"))
    assert decode_reply(good) == RepoReply("a", "ok", 5, 10, b"hello")
    for bad in (good[:3], b"\xff\xff\xff\xff" + good[4:], good[:10], good[:4] + b"x" * (len(good) - 4)):
        with pytest.raises(RepoProtocolError):
            decode_reply(bad)
    with pytest.raises(RepoProtocolError):
        decode_reply(encode_reply(RepoReply("a", "ok", 0, 1, b"x" * (MAX_CHUNK + 1))))
    assert request_device("edgert/v1/f1/repo/req/dev-a", "f1") == "dev-a"
    assert request_device("edgert/v1/f1/repo/req/+", "f1") is None


def test_desired_state_signature() -> None:
    key = Ed25519PrivateKey.generate()
    doc = sign_desired_state({"v": 1, "fleet": "f1", "seq": 3, "model": "digits", "version": "2"}, key)
    verify_desired_signature(doc, key.public_key())
    for forged in ({**doc, "seq": 4}, {k: v for k, v in doc.items() if k != "sig"}, {**doc, "sig": "!!"}):
        with pytest.raises(SignatureError):
            verify_desired_signature(forged, key.public_key())
    with pytest.raises(SignatureError):
        verify_desired_signature(doc, Ed25519PrivateKey.generate().public_key())
