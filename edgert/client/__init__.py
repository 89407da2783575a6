"""Python client for a running edgert daemon: ``Client("unix:///run/edgert/edgert.sock")`` or ``http://``.

>>> from edgert.client import Client
>>> with Client("unix:///run/edgert/edgert.sock") as c:
...     outputs = c.infer("digits", {"pixels": x})
"""

from edgert.client._client import Client, notify_daemon_activate

__all__ = ["Client", "notify_daemon_activate"]
