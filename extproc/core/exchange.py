"""One exchange, whatever carried it: its Context, its merged mutations, the answer to a stop.

Both front doors (ext_proc streams and ext_authz checks, over gRPC or HTTP) go
through these, so an exchange looks the same to the stages whichever door it took::

    header lines (lower-case names, in order) + server hint + catalog
        ──▶ new_context: first values, request id, server (hint, else path) ──▶ Context
    Continue, Continue, ... (stages, or a check's two phases)
        ──▶ Mutations.add: a later word on a header wins ──▶ one Continue
    Deny | Answer
        ──▶ answer_of: status, body (JSON-RPC error with the request's id), headers
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from extproc.api import Answer, Context, Continue, FrontDoor, Stop
from extproc.config.resources import Catalog
from extproc.mcp.headers import CONTENT_TYPE
from extproc.mcp.jsonrpc import encode_error

_exchange_logger = logging.getLogger("mcp_extproc.exchange")


class ExchangeLog(logging.LoggerAdapter[logging.Logger]):
    """A logger that prefixes every line with the exchange's request id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{(self.extra or {}).get('request_id')}] {msg}", kwargs


def first_values(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Header name → its first value (what stages read as ``ctx.request_headers``)."""
    first: dict[str, str] = {}
    for key, value in pairs:
        first.setdefault(key, value)
    return first


def new_context(
    catalog: Catalog,
    pairs: tuple[tuple[str, str], ...],
    *,
    server_hint: str | None,
    front_door: FrontDoor,
    method: str | None = None,
    path: str | None = None,
    request_id: str | None = None,
) -> Context:
    """The Context of a new exchange from its header lines.

    ``method`` and ``path`` stand in for ``:method``/``:path`` where the transport
    carries them apart from the headers (ext_authz). The server is the one the
    route names (``server_hint``), else the one the path names.
    """
    headers = first_values(pairs)
    if method is not None:
        headers.setdefault(":method", method)
    if path is not None:
        headers.setdefault(":path", path)
    request_id = headers.get("x-request-id") or request_id or uuid.uuid4().hex
    method = method if method is not None else headers.get(":method", "GET")
    path = path if path is not None else headers.get(":path", "/")
    server = catalog.servers.get(server_hint) if server_hint else None
    virtual = catalog.virtual_servers.get(server_hint) if server_hint else None
    if server is None and virtual is None:
        server = catalog.server_for_path(path)
        virtual = catalog.virtual_for_path(path) if server is None else None
    return Context(
        request_id=request_id,
        http_method=method,
        path=path,
        request_headers=headers,
        request_header_list=pairs,
        server=server,
        virtual=virtual,
        catalog=catalog,
        front_door=front_door,
        log=ExchangeLog(_exchange_logger, {"request_id": request_id}),
    )


class Mutations:
    """Header, body and metadata mutations merged in order: a later word on a header wins."""

    __slots__ = ("body", "metadata", "remove_headers", "set_headers")

    def __init__(self) -> None:
        self.set_headers: dict[str, str] = {}
        self.remove_headers: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.body: bytes | None = None

    def add(self, verdict: Continue) -> None:
        """Overlay ``verdict``'s mutations on those merged so far."""
        for name in verdict.remove_headers:
            self.set_headers.pop(name, None)
        if verdict.set_headers:
            self.remove_headers = [n for n in self.remove_headers if n not in verdict.set_headers]
        self.set_headers.update(verdict.set_headers)
        self.remove_headers.extend(n for n in verdict.remove_headers if n not in self.remove_headers)
        self.metadata.update(verdict.metadata)
        if verdict.body is not None:
            self.body = verdict.body

    def result(self) -> Continue:
        """Everything merged, as one :class:`Continue`."""
        return Continue(
            set_headers=self.set_headers,
            remove_headers=tuple(self.remove_headers),
            body=self.body,
            metadata=self.metadata,
        )


def answer_of(stop: Stop, jsonrpc_id: Any) -> tuple[bytes, dict[str, str]]:
    """The body and headers the agent gets for a denial or a direct answer (every front door)."""
    if isinstance(stop, Answer):
        body = stop.body
    else:
        body = stop.body if stop.body is not None else encode_error(jsonrpc_id, stop.code, stop.message, stop.data)
    return body, {CONTENT_TYPE: "application/json", **stop.headers}
