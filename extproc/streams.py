"""Response bodies a stage streams to the agent itself (the ``virtual`` stage's merged GET stream).

ext_proc can answer a request once (an immediate response), not hold it open and write
to it later. A stage that must stream an answer it makes up itself offers the body here
and sends the request on to our stream service, which Envoy reaches on a unix socket::

    stage (request headers) ──offer(open_body)──▶ ticket (random, single use, 30 s)
        ──▶ Continue(set_headers={x-mcp-stream: ticket}) ──▶ Envoy re-routes the request
            to the stream cluster (extproc.render.routes; the stream service's socket)
    stream service (extproc.frontdoor.stream_service) ──claim(ticket)──▶ open_body()
        ──▶ 200 text/event-stream, each chunk as the body yields it, until the body ends
            or Envoy closes the connection (the body is then closed: its finally runs)

A ticket is worth nothing to anyone else: it is unguessable, claimed once, and expires;
the stage has judged the request (identity, session) before it offers one.

Several replicas of the extension server each run a stream service, and a ticket can only
be claimed in the process that offered it. So a ticket starts with its process's tag,
``replica_tag(<its stream socket>)`` and a dot; the renderer, given every replica's socket,
routes each tag to its own socket (``extproc.render.routes``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Final

STREAM_HEADER: Final = "x-mcp-stream"
"""Set by a stage on a request whose answer the stream service streams (its ticket);
the renderer routes on it (``extproc.render.routes`` imports it from here)."""

OpenBody = Callable[[], AsyncIterator[bytes]]


def replica_tag(socket_path: str) -> str:
    """The tag of the tickets a process whose stream service listens on ``socket_path`` offers."""
    return hashlib.sha256(os.path.normpath(socket_path).encode()).hexdigest()[:12]


class StreamOffers:
    """Bodies offered by stages, by ticket, until the stream service claims them."""

    def __init__(self, ttl_s: float = 30.0, max_offers: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_offers = max_offers
        self._offers: OrderedDict[str, tuple[float, OpenBody]] = OrderedDict()
        self.services = 0
        """Stream services running in this process (none: a stage has nowhere to stream to)."""
        self.tag: str | None = None
        """This process's :func:`replica_tag`, set by its stream service; tickets start with it."""

    def offer(self, open_body: OpenBody) -> str:
        """A ticket for ``open_body`` (the oldest offers go first past ``max_offers``)."""
        self._expire()
        ticket = secrets.token_urlsafe(24)
        if self.tag is not None:
            ticket = f"{self.tag}.{ticket}"
        self._offers[ticket] = (time.monotonic() + self.ttl_s, open_body)
        while len(self._offers) > self.max_offers:
            self._offers.popitem(last=False)
        return ticket

    def claim(self, ticket: str) -> OpenBody | None:
        """The body offered under ``ticket``, once; ``None`` if unknown, claimed or expired."""
        found = self._offers.pop(ticket, None)
        if found is None or time.monotonic() >= found[0]:
            return None
        return found[1]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._offers:
            ticket, (expires, _) = next(iter(self._offers.items()))
            if expires > now:
                return
            del self._offers[ticket]


OFFERS: Final = StreamOffers()
"""The process's offers: stages offer, the stream service claims."""

__all__ = ["OFFERS", "STREAM_HEADER", "OpenBody", "StreamOffers", "replica_tag"]
