"""Python client for a running edgert daemon: ``Client("unix:///run/edgert/edgert.sock")`` or ``http://``.

>>> from edgert.client import Client
>>> with Client("unix:///run/edgert/edgert.sock") as c:
...     outputs = c.infer("digits", {"pixels": x})
"""

from edgert.client._client import Client, notify_daemon_activate
from edgert.client._streams import Stream, StreamEnded, StreamResult

__all__ = ["Client", "Stream", "StreamEnded", "StreamResult", "notify_daemon_activate"]
