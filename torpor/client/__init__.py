"""The remote SDK: ``torpor.Client(url, token)`` for a ``torpor serve`` server.

``Client(url, token).Sandbox`` and ``.Session`` have the methods of the local
:class:`torpor.Sandbox` and :class:`torpor.Session` (:mod:`torpor.client.sync`);
``torpor.aio.Client`` is the awaitable twin (:mod:`torpor.client.aio`).  Both share
the wire rules in :mod:`torpor.client._wire`.  See docs/api.md, "Remote".
"""

from torpor.client.sync import Client, RemoteSandbox, RemoteSession

__all__ = ["Client", "RemoteSandbox", "RemoteSession"]
