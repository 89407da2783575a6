"""Who owns a Unix socket path: refuse a live one, replace a stale one, remove only our own.

A second daemon started on the same path must not take the socket from the first (unlinking a
socket file does not disturb its listener, so both would "run"), and a daemon that exits must not
delete a socket file that another daemon has bound since.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from edgert.errors import ConfigError

__all__ = ["SocketFileId", "identify", "prepare_path", "remove_if_ours"]

log = logging.getLogger("edgert.serve.uds")

#: (st_dev, st_ino) of a bound socket file.
SocketFileId = tuple[int, int]


def _in_use(path: Path) -> ConfigError:
    return ConfigError(f"another edgert daemon is serving on {path}: stop it or set [socket] path")


def prepare_path(path: Path) -> None:
    """Make ``path`` free to bind: refuse a live listener or a non-socket, remove a stale socket file.

    Raises ConfigError naming the path. A probe ``connect()`` tells a live socket (accepted, or a
    full backlog) from a stale file nobody listens on (``ECONNREFUSED``).
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket path {path} exists and is not a socket", hint="choose another socket.path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # never wait on a live server's full backlog
    try:
        probe.connect(str(path))
    except BlockingIOError:  # EAGAIN: backlog full, so someone is listening
        raise _in_use(path) from None
    except ConnectionRefusedError:
        pass  # stale: nobody listens
    except FileNotFoundError:
        return  # removed meanwhile
    except OSError as exc:
        raise ConfigError(
            f"socket path {path}: cannot tell whether another daemon serves on it ({exc.strerror or exc})",
            hint="check the permissions of the socket and its directory, or set [socket] path",
        ) from None
    else:
        raise _in_use(path)
    finally:
        probe.close()
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    log.info("removed a stale socket file", extra={"path": str(path)})


def identify(path: Path) -> SocketFileId:
    """The identity of the socket file we just bound, to recognise it at stop."""
    st = path.lstat()
    return st.st_dev, st.st_ino


def remove_if_ours(path: Path, ours: SocketFileId | None) -> bool:
    """Unlink ``path`` only if it is still the file we bound; True if removed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if ours is None or (st.st_dev, st.st_ino) != ours:
        log.warning("socket file was replaced by another process; leaving it", extra={"path": str(path)})
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True

