"""The author's kit: write an external stage server in a few lines.

An external stage is a gRPC service speaking ``mcp_extproc.stage.v1.ExternalStage``
(``protos/``); mcp-extproc's built-in ``external`` stage calls it. This module hides
the protocol: write an async function over a :class:`Request`, return ``None``
(carry on), :class:`Forward` (carry on, optionally replacing params or result) or
:class:`Refuse`, and serve it::

    from extproc.external.kit import Refuse, Request, serve, stage

    @stage("no-drop-table", methods=["tools/call"])
    async def no_drop_table(request: Request) -> Refuse | None:
        if "drop table" in str(request.arguments).lower():
            return Refuse("SQL DDL is not allowed in tool arguments")
        return None

    serve(no_drop_table, "unix:/run/no-drop-table.sock")   # or "127.0.0.1:50061"

Data flow::

    Describe ─▶ name, phases, methods, failure mode (checked here when the stage is made)
    Process  ─▶ ProcessRequest ─▶ Request (plain JSON values) ─▶ your handler
             ◀─ ProcessResponse ◀─ None | Forward | Refuse
    an exception in the handler ─▶ gRPC INTERNAL (logged here; mcp-extproc applies the
                                   stage's failure mode: closed by default)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import grpc

from extproc.external.wire import from_struct, message_json, to_struct, to_value, validate_description
from extproc.mcp.codes import POLICY_DENIED
from mcp_extproc.stage.v1 import stage_pb2 as pb
from mcp_extproc.stage.v1 import stage_pb2_grpc as pb_grpc

__all__ = ["Caller", "Forward", "Refuse", "Request", "ServerTls", "StageService", "main", "serve", "stage", "start"]

log = logging.getLogger("mcp_extproc.stagekit")

PhaseName = Literal["request", "response"]
_PHASES: Final[Mapping[str, pb.Phase.ValueType]] = {"request": pb.PHASE_REQUEST, "response": pb.PHASE_RESPONSE}


@dataclass(frozen=True)
class Caller:
    """Who is calling, as mcp-extproc's ``authn`` stage established it (no token, ever)."""

    subject: str
    issuer: str
    claims: Mapping[str, Any]
    scopes: tuple[str, ...]
    granted: str
    consented: str


@dataclass(frozen=True)
class Request:
    """One MCP message, as plain JSON values.

    Attributes:
        phase: ``"request"`` (before the MCP server sees it) or ``"response"`` (before the agent does).
        method: the JSON-RPC method (for a response: of the request it answers).
        id: the JSON-RPC id (``None`` for a notification).
        tool: for ``tools/call``, the tool's name.
        arguments: for ``tools/call``, the arguments.
        params: the request's whole ``params`` (request phase).
        result: the response's result (response phase, when not an error).
        error: the response's error object (response phase, when an error).
        server: the MCPServer the exchange targets.
        agent: the MCPAgent the caller was matched to, if any.
        caller: the authenticated caller, if an ``authn`` stage ran.
        request_id: Envoy's ``x-request-id``.
        era: ``"legacy"`` or ``"modern"``.
        protocol_version: the MCP revision, when known.
        batch: True for an element of a JSON-RPC batch.
        metadata: what earlier external stages of this exchange published.
    """

    phase: PhaseName
    method: str
    id: str | int | None
    tool: str | None
    arguments: dict[str, Any] | None
    params: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    server: str
    agent: str | None
    caller: Caller | None
    request_id: str
    era: str
    protocol_version: str
    batch: bool
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Forward:
    """Forward the message (to the MCP server, or to the agent), maybe changed.

    ``params`` replaces the request's params; ``result`` the response's result. Named
    apart from :class:`extproc.api.Continue`: this is the external protocol's answer,
    not an in-process stage's verdict.
    """

    params: Mapping[str, Any] | None = None
    result: Mapping[str, Any] | None = None
    set_headers: Mapping[str, str] = field(default_factory=dict)
    remove_headers: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refuse:
    """Refuse the message: the agent gets this JSON-RPC error (default code -32003, policy denied).

    Named apart from :class:`extproc.api.Deny`, the in-process stages' verdict.
    """

    message: str
    code: int = POLICY_DENIED
    data: Any = None
    metadata: Mapping[str, str] = field(default_factory=dict)


Reply = Forward | Refuse | None
Handler = Callable[[Request], Awaitable[Reply]]


class StageService:
    """An external stage: a description plus a handler. Build one with :func:`stage`."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        phases: Sequence[PhaseName] = ("request",),
        methods: Sequence[str] = (),
        failure_mode: Literal["closed", "open"] = "closed",
    ) -> None:
        """Describe the stage; a description mcp-extproc would refuse raises ``PluginError`` here."""
        unknown = [p for p in phases if p not in _PHASES]
        if unknown:
            raise ValueError(f"stage {name!r}: unknown phase {unknown[0]!r}; expected 'request' or 'response'")
        self.description = validate_description(
            pb.DescribeResponse(
                name=name,
                phases=[_PHASES[p] for p in phases],
                methods=list(methods),
                failure_mode=pb.FAILURE_MODE_OPEN if failure_mode == "open" else pb.FAILURE_MODE_CLOSED,
            ),
            f"stagekit stage {name!r}",
        )
        self.handler = handler

    @property
    def name(self) -> str:
        """The stage's name."""
        return self.description.name


def stage(
    name: str,
    *,
    phases: Sequence[PhaseName] = ("request",),
    methods: Sequence[str] = (),
    failure_mode: Literal["closed", "open"] = "closed",
) -> Callable[[Handler], StageService]:
    """Decorator: turn ``async def handler(request) -> Reply`` into a :class:`StageService`."""

    def wrap(handler: Handler) -> StageService:
        return StageService(name, handler, phases=phases, methods=methods, failure_mode=failure_mode)

    return wrap


def to_request(wire: pb.ProcessRequest) -> Request:
    """Decode a ``ProcessRequest`` into a :class:`Request`."""
    message = message_json(wire.message)
    caller = None
    if wire.HasField("principal"):
        p = wire.principal
        caller = Caller(p.subject, p.issuer, from_struct(p.claims), tuple(p.scopes), p.granted, p.consented)
    return Request(
        phase="response" if wire.phase == pb.PHASE_RESPONSE else "request",
        method=message["method"],
        id=message["id"],
        tool=message["tool"],
        arguments=message["arguments"],
        params=message["params"],
        result=message["result"],
        error=message["error"],
        server=wire.server,
        agent=wire.agent or None,
        caller=caller,
        request_id=wire.request_id,
        era=wire.era,
        protocol_version=wire.protocol_version,
        batch=wire.batch,
        metadata=dict(wire.metadata),
    )


def to_response(reply: Reply) -> pb.ProcessResponse:
    """Encode a handler's answer as a ``ProcessResponse``."""
    out = pb.ProcessResponse()
    if reply is None:
        return out
    out.metadata.update(reply.metadata)
    if isinstance(reply, Refuse):
        out.deny.code = reply.code
        out.deny.message = reply.message
        if reply.data is not None:
            out.deny.data.CopyFrom(to_value(reply.data))
        return out
    proceed = getattr(out, "continue")  # `continue` is a Python keyword
    proceed.SetInParent()
    if reply.params is not None:
        proceed.params.CopyFrom(to_struct(reply.params))
    if reply.result is not None:
        proceed.result.CopyFrom(to_struct(reply.result))
    out.set_headers.update(reply.set_headers)
    out.remove_headers.extend(reply.remove_headers)
    return out


class _Servicer(pb_grpc.ExternalStageServicer):
    def __init__(self, service: StageService) -> None:
        self.service = service

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        return self.service.description

    async def Process(self, request: pb.ProcessRequest, context: grpc.aio.ServicerContext) -> pb.ProcessResponse:
        try:
            return to_response(await self.service.handler(to_request(request)))
        except Exception as exc:
            log.exception("stage %r failed on %s", self.service.name, request.message.method)
            await context.abort(grpc.StatusCode.INTERNAL, f"stage {self.service.name!r} failed: {type(exc).__name__}")
            raise  # unreachable: abort raises


@dataclass(frozen=True)
class ServerTls:
    """TLS for the stage server; with ``client_ca`` it requires client certificates (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


async def start(service: StageService, address: str, *, tls: ServerTls | None = None) -> tuple[grpc.aio.Server, str]:
    """Start serving ``service`` at ``address`` (``host:port``, port 0 allowed, or ``unix:/path``).

    Returns:
        The started server and the address it is reachable at (the real port for port 0).
    """
    server = grpc.aio.server()
    pb_grpc.add_ExternalStageServicer_to_server(_Servicer(service), server)
    if tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    if address.startswith("unix:"):
        return server, address
    host = address.rsplit(":", 1)[0]
    return server, f"{host}:{port}"


async def _serve(service: StageService, address: str, tls: ServerTls | None, grace_s: float) -> None:
    server, bound = await start(service, address, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    log.info("stage %r serving at %s", service.name, bound)
    await stop.wait()
    await server.stop(grace_s)


def serve(service: StageService, address: str, *, tls: ServerTls | None = None, grace_s: float = 2.0) -> None:
    """Serve ``service`` until SIGINT/SIGTERM; prints ``READY <address>`` once it accepts calls."""
    asyncio.run(_serve(service, address, tls, grace_s))


def main(service: StageService, argv: Sequence[str] | None = None) -> int:
    """A ready-made command line: ``--address``, ``--tls-cert/--tls-key/--tls-client-ca``."""
    parser = argparse.ArgumentParser(description=f"external stage {service.name!r} for mcp-extproc")
    parser.add_argument("--address", default="127.0.0.1:50061", help="host:port (port 0: any) or unix:/path")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)
    serve(service, args.address, tls=tls)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("extproc.external.kit is a library: see its docstring")
