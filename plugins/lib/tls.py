"""One TLS client context for every outbound ``httpx.AsyncClient`` of the stages.

An ``httpx.AsyncClient`` made without ``verify`` builds its own ``ssl.SSLContext`` and loads
certifi's CA bundle into it: about 0.8 MB resident per client, and the default pipeline
opens five (authn's JWKS client, credentials' token client, the session keeper's two,
the virtual server's two) before any request. They all verify the same way, so they share
this one::

    httpx.AsyncClient(..., verify=client_context())

The context is httpx's own default (:func:`httpx.create_ssl_context`): certifi's bundle,
or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set and ``trust_env`` (read once, when the
context is first made). An ``SSLContext`` is safe to share between clients and threads.
"""

from __future__ import annotations

import functools
import os
import ssl

import httpx


@functools.cache
def client_context(trust_env: bool = True) -> ssl.SSLContext:
    """The shared context of clients made with ``trust_env`` (httpx's default: True).

    Without ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` both values verify alike, and get one context.
    """
    if trust_env and (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
        return httpx.create_ssl_context(trust_env=True)
    return _certifi_context()


@functools.cache
def _certifi_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=False)
