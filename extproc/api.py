"""The stage contract: everything a plugin author needs, and nothing else.

A *stage* is one step of the pipeline the server runs over every MCP exchange
(one HTTP request and its response). Envoy sends the exchange to us in phases
over ext_proc; the pipeline calls the matching hook of every stage, in the
order the configuration lists them.

Data flow for one exchange::

    Envoy phase            hook called on each stage          what a stage may return
    ─────────────────────  ─────────────────────────────────  ───────────────────────────────
    request headers   ──▶  on_request_headers(ctx)       ──▶  None | Continue(headers) | Deny | Answer
    request body      ──▶  on_request_body(ctx)          ──▶  None | Continue(headers, body) | Deny | Answer
    response headers  ──▶  on_response_headers(ctx)      ──▶  None | Continue(headers) | Deny
    response body     ──▶  on_response_body(ctx, chunk)  ──▶  None | Continue(body) | Deny
    (chunk by chunk when streamed; once, whole, when buffered)

Rules of the contract:

* A hook returns ``None`` (no opinion), :class:`Continue` (carry on, with
  optional header/body mutations and dynamic metadata), :class:`Deny` (refuse)
  or :class:`Answer` (answer the agent directly, e.g. a metadata document).
  Denials are values; an exception raised by a hook is a *fault* and is
  handled by the stage's :attr:`Stage.failure_mode` (closed by default: the
  exchange is refused with HTTP 503 and a JSON-RPC error).
* The first :class:`Deny` or :class:`Answer` wins: later stages are not called
  for that phase, and Envoy answers the agent directly; the upstream never sees
  the request. When the JSON-RPC request id is known, a denial's answer is a
  JSON-RPC error with that id; its HTTP status comes from the one table of codes
  (:mod:`extproc.mcp.codes`) unless the denial names one.
* Which hooks a stage overrides decides which phases Envoy sends at all: a
  pipeline whose stages never look at responses makes Envoy skip them. A stage
  that reads response bodies must ask for them per exchange with
  :meth:`Context.want_response_body` during a request hook, so that
  exchanges nobody reads stream straight through. It may also override
  :meth:`Stage.needs_response` so that Envoy skips the response phases of
  exchanges it can rule out from the request headers alone.
* Streamed response bodies (``text/event-stream``) arrive chunk by chunk and
  must be handled incrementally: never wait for the whole stream.
* Stages never see Envoy's protobufs; they see :class:`Context`.
* State that lives for one exchange goes in :meth:`Context.state`; state that
  outlives it (sessions, tokens, buckets) lives in stores a stage creates in
  :meth:`Stage.startup`.

A minimal stage::

    class DenyDeleteConfig(StageConfig):
        message: str = "tools may not delete"

    class DenyDelete(Stage[DenyDeleteConfig]):
        name = "deny-delete"

        async def on_request_body(self, ctx: Context) -> Verdict:
            if ctx.mcp is not None and ctx.mcp.tool_name == "delete":
                return Deny(code=POLICY_DENIED, message=self.config.message)  # HTTP 200, from the codes table
            return None

Register it under the entry-point group ``mcp_extproc.stages`` and name it in
the pipeline configuration; only stages the configuration names are loaded.
:mod:`extproc.testing` runs a stage's hooks in process, for its tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Protocol, TypeAlias, TypeVar

from pydantic import BaseModel, ConfigDict

from extproc.config.pipeline_file import FailureMode
from extproc.mcp.codes import POLICY_DENIED, http_status_for

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from extproc.config.resources import Catalog, MCPServer, MCPVirtualServer
    from extproc.mcp.jsonrpc import HeaderHints, McpRequest

__all__ = [
    "HOOK_NAMES",
    "POLICY_DENIED",
    "WORKLOAD_ISSUER",
    "Answer",
    "Bookkeeping",
    "Context",
    "Continue",
    "Deny",
    "Downstream",
    "FailureMode",
    "FrontDoor",
    "Phase",
    "Principal",
    "Stage",
    "StageConfig",
    "StateKey",
    "Stop",
    "Verdict",
]

T = TypeVar("T")


class Phase(StrEnum):
    """The four HTTP phases Envoy can send us."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"


HOOK_NAMES: Mapping[Phase, str] = {
    Phase.REQUEST_HEADERS: "on_request_headers",
    Phase.REQUEST_BODY: "on_request_body",
    Phase.RESPONSE_HEADERS: "on_response_headers",
    Phase.RESPONSE_BODY: "on_response_body",
}
"""Phase → the hook the pipeline calls for it."""


@dataclass(frozen=True, slots=True)
class Continue:
    """Carry on, applying these mutations.

    Attributes:
        set_headers: headers to add or overwrite (lower-case names). On a
            request phase they reach the upstream; on a response phase, the agent.
        remove_headers: header names to remove.
        body: a replacement for the body (request body, or the current response
            chunk when streamed). ``None`` leaves the body as it is.
        metadata: keys published as Envoy dynamic metadata under the
            ``mcp_extproc`` namespace (for routing, RBAC and access logs).
    """

    set_headers: Mapping[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Deny:
    """Refuse the exchange; Envoy answers the agent and the upstream sees nothing.

    Attributes:
        code: JSON-RPC error code (:mod:`extproc.mcp.codes` lists the gateway's).
        message: human-readable JSON-RPC error message (never a secret).
        status: HTTP status of the answer; by default the one the codes table
            (:data:`extproc.mcp.codes.ERROR_HTTP_STATUS`) lists for ``code``, 200
            for a code it does not list (a JSON-RPC-level refusal of a well-formed
            call). Name another where the transport says more (413, 502, 503).
        reason: a short machine-friendly reason for logs and metrics.
        data: optional JSON-RPC error ``data``.
        headers: extra response headers.
        body: a ready-made JSON-RPC answer (e.g. a batch of errors) to send
            instead of the single error built from ``code``/``message``.
    """

    code: int
    message: str
    status: int = 0
    reason: str = "denied"
    data: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", http_status_for(self.code))


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """Answer the agent directly with ``body`` (e.g. a metadata document): not a refusal.

    The upstream sees nothing, as with :class:`Deny`, but the exchange is counted
    and audited as decision ``answer``.

    Attributes:
        body: the answer's bytes.
        status: its HTTP status.
        headers: its headers (``content-type`` defaults to ``application/json``).
        reason: a short machine-friendly reason for logs and metrics.
    """

    body: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    reason: str = "answer"


Stop: TypeAlias = Deny | Answer
"""A verdict that ends the exchange here: Envoy answers the agent, the upstream sees nothing."""

Verdict: TypeAlias = Continue | Deny | Answer | None
"""What a hook returns: no opinion, carry on (with mutations), refuse, or answer directly."""


WORKLOAD_ISSUER: Final = "workload"
"""The issuer of a principal the deployment identified (a sidecar serves one agent), not a token."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, as established by the ``authn`` stage.

    Attributes:
        subject: the token's ``sub`` (``"anonymous"`` when no agent is declared); without
            a token, the mTLS peer's SPIFFE ID, or the name of the agent the deployment
            serves (:data:`WORKLOAD_ISSUER`).
        issuer: the token's ``iss`` (``""`` when anonymous); without a token,
            ``spiffe://<trust domain>`` or :data:`WORKLOAD_ISSUER`.
        agent: the name of the ``MCPAgent`` the caller was matched to, if any.
        claims: every claim of the validated token.
        scopes: the token's scopes (``scope``/``scp`` claims).
        granted: the trust level the agent is granted (``low``/``medium``/``high``).
        consented: the trust level the user consented to (the agent's consent
            claim when present, else ``granted``).
        token: the validated inbound token itself, for token exchange only. It
            is never printed: ``repr`` hides it. Never forward it upstream.
    """

    subject: str
    issuer: str = ""
    agent: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    scopes: frozenset[str] = frozenset()
    granted: str = "low"
    consented: str = "low"
    token: str = field(default="", repr=False)

    @property
    def anonymous(self) -> bool:
        """True when no token was presented because no agent identity is declared."""
        return not self.issuer

    @property
    def key(self) -> str:
        """A stable key for caches and buckets: ``issuer|subject``."""
        return f"{self.issuer}|{self.subject}"


class StageConfig(BaseModel):
    """Base for a stage's ``Config`` model: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StateKey(Generic[T]):
    """A typed key for per-exchange stage state (see :meth:`Context.state`)."""

    __slots__ = ("factory", "name")

    def __init__(self, name: str, factory: type[T]) -> None:
        self.name = name
        self.factory = factory

    def __repr__(self) -> str:
        return f"StateKey({self.name!r})"


class FrontDoor(StrEnum):
    """How Envoy brought the exchange to the pipeline."""

    EXT_PROC = "ext_proc"
    """An ext_proc stream: request and response phases, body rewriting."""
    CHECK = "check"
    """One ext_authz ``Check`` (front door ``ext_authz``): the request side only."""
    FAST_CALL = "fast_call"
    """One ``Check`` for a ``tools/call`` on the ``auto`` front door's fast route. No
    response phases for this call, but the rest of the gateway (initialize, GET
    streams, ``tools/list``) still runs through ext_proc and this process."""


@dataclass(slots=True)
class Bookkeeping:
    """What the pipeline and the front doors keep about an exchange. Stages never touch it.

    Attributes:
        started: when the exchange reached us (``time.perf_counter``), for the audit line.
        explanations: what :meth:`Context.explain` recorded, for the audit line.
        wants_response_body: a stage called :meth:`Context.want_response_body`.
        response_streamed: the response body arrives in chunks (an SSE stream of
            unknown length) rather than whole.
        trace: the exchange's span while tracing is on
            (:class:`extproc.core.traces.ExchangeTrace`); ``None`` while it is off.
        audit: fields :meth:`Context.audit` added to the audit line.
    """

    started: float = field(default_factory=time.perf_counter)
    explanations: list[str] = field(default_factory=list)
    wants_response_body: bool = False
    response_streamed: bool = False
    trace: Any = None
    audit: dict[str, Any] = field(default_factory=dict)


class Context:
    """Everything a stage knows about one exchange; one per exchange, never shared.

    Stages read these attributes and write only ``body`` (through
    :class:`Continue`), ``hints``, ``mcp`` and ``principal`` (the stages that
    establish them) and their own :meth:`state`.

    Attributes:
        request_id: Envoy's ``x-request-id`` (or a generated one).
        http_method: the request's HTTP method (``POST``, ``GET``, ``DELETE``).
        path: the request path as the agent sent it.
        request_headers: request headers, lower-case names (first value wins).
        request_header_list: every request header line, in order (for
            duplicate checks).
        server: the ``MCPServer`` this exchange targets, when known. On a virtual
            server's route: ``None`` until the ``virtual`` stage picks the backend a
            call goes to; from then on (and in the exchanges it sends each backend) that
            backend, so the stages after it judge the call as on the backend's own route.
        virtual: the ``MCPVirtualServer`` whose route the agent called, if it did.
        catalog: every loaded resource (read-only).
        front_door: how Envoy brought this exchange (see :class:`FrontDoor`).
        body: the (possibly size-limited) request body, once received.
        request_has_body: the request carries a body (it may not have arrived yet).
        hints: what the request headers alone say about the MCP request (era,
            ``Mcp-Method``/``Mcp-Name``), set by the ``mcp`` stage.
        mcp: the parsed MCP request, set by the ``mcp`` stage.
        response_status: the upstream's HTTP status, once known.
        response_headers: response headers, once known.
        end_of_stream: True on the last response chunk.
        log: a logger bound to this exchange's request id.
        principal: the caller, set by the ``authn`` stage (``None`` before it
            runs or when it is not configured).
        peer: the URI SAN (a SPIFFE ID) of the client certificate Envoy verified on
            the agent's connection, as Envoy reports it (ext_proc's
            ``connection.uri_san_peer_certificate`` attribute, ext_authz's
            ``source.principal``); ``None`` without mTLS. Never taken from a request header.
        book: the pipeline's own bookkeeping (:class:`Bookkeeping`); not for stages.
    """

    __slots__ = (
        "_state",
        "body",
        "book",
        "catalog",
        "end_of_stream",
        "front_door",
        "hints",
        "http_method",
        "log",
        "mcp",
        "path",
        "peer",
        "principal",
        "request_has_body",
        "request_header_list",
        "request_headers",
        "request_id",
        "response_headers",
        "response_status",
        "server",
        "virtual",
    )

    def __init__(
        self,
        *,
        request_id: str,
        http_method: str,
        path: str,
        request_headers: Mapping[str, str],
        request_header_list: tuple[tuple[str, str], ...] = (),
        server: MCPServer | None = None,
        virtual: MCPVirtualServer | None = None,
        catalog: Catalog | None = None,
        front_door: FrontDoor = FrontDoor.EXT_PROC,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.request_id = request_id
        self.http_method = http_method
        self.path = path
        self.request_headers = request_headers
        self.request_header_list = request_header_list
        self.server = server
        self.virtual = virtual
        self.catalog = catalog
        self.front_door = front_door
        self.body: bytes = b""
        self.request_has_body = False
        self.hints: HeaderHints | None = None
        self.mcp: McpRequest | None = None
        self.response_status: int | None = None
        self.response_headers: Mapping[str, str] = {}
        self.end_of_stream = False
        self.log = log or logging.getLogger("mcp_extproc.exchange")
        self.principal: Principal | None = None
        self.peer: str | None = None
        self.book = Bookkeeping()
        self._state: dict[str, Any] = {}

    @property
    def route_name(self) -> str | None:
        """The name the agent addressed: the virtual server's, else the server's (``None``: neither)."""
        if self.virtual is not None:
            return self.virtual.name
        return self.server.name if self.server is not None else None

    def state(self, key: StateKey[T]) -> T:
        """The per-exchange state object for ``key``, created on first use."""
        found = self._state.get(key.name)
        if found is None:
            found = key.factory()
            self._state[key.name] = found
        return found

    def explain(self, text: str) -> None:
        """Record why a decision was taken (the rule or Rego result); it goes to the audit line.

        Never put a token or secret in ``text``.
        """
        self.book.explanations.append(text)

    def audit(self, name: str, value: Any) -> None:
        """Add field ``name`` to the audit line (the fields the line has of its own win).

        Never put a token or secret in ``value``.
        """
        self.book.audit[name] = value

    def want_response_body(self) -> None:
        """Ask the pipeline to send this exchange's response body to the stages.

        Call it from a request hook. Streamed (SSE) responses then arrive
        chunk by chunk, other responses whole.
        """
        self.book.wants_response_body = True

    @property
    def sees_responses(self) -> bool:
        """False when the front door never shows the stages this exchange's response."""
        return self.front_door is FrontDoor.EXT_PROC

    @property
    def fast_call(self) -> bool:
        """True for a ``tools/call`` on the ``auto`` front door's fast route (see :class:`FrontDoor`)."""
        return self.front_door is FrontDoor.FAST_CALL

    @property
    def response_content_type(self) -> str:
        """The response's media type, lower-case, without parameters (``""`` if unknown)."""
        value = self.response_headers.get("content-type", "")
        return value.split(";", 1)[0].strip().lower()

    @property
    def response_is_sse(self) -> bool:
        """True when the response is a ``text/event-stream``."""
        return self.response_content_type == "text/event-stream"

    @property
    def jsonrpc_id(self) -> Any:
        """The JSON-RPC id to answer a denial with (``None`` when unknown or a batch)."""
        if self.mcp is None or self.mcp.is_batch or not self.mcp.messages:
            return None
        return self.mcp.messages[0].id


class Downstream(Protocol):
    """The stages after one stage, for a stage that sends exchanges of its own through them.

    A stage that defines ``bind_downstream(self, downstream: Downstream) -> None`` is given
    one when its pipeline is built (the ``virtual`` stage judges each backend request with
    the stages after it, exactly as on the backend's own route).
    """

    async def run(self, phase: Phase, ctx: Context, chunk: bytes = b"") -> Continue | Stop:
        """Run ``phase`` of ``ctx`` over the stages after the bound one; their merged verdict."""
        ...


C = TypeVar("C", bound=StageConfig)


class Stage(Generic[C]):
    """Base class of every stage. Subclass it and override only the hooks you need.

    A stage is generic over its configuration model: ``class MyStage(Stage[MyConfig])``
    makes ``self.config`` a ``MyConfig`` for the type checker, and sets ``Config``
    to ``MyConfig`` unless the class names it itself.

    Class attributes:
        name: the name the pipeline configuration uses for this stage.
        Config: the pydantic model of the stage's configuration.
        requires: names of stages that must run before this one.
        calls_need_ext_proc: the MCP eras (``"legacy"``, ``"modern"``) whose
            ``tools/call`` this stage needs ext_proc for: it reads the call's
            response, or may rewrite the call's body (ext_authz can do neither).
            Only consulted for stages that override ``on_request_body`` or a
            response hook. Where no stage needs it, a ``tools/call`` of that era
            is decided by one ext_authz ``Check`` (the fast path, see
            :func:`extproc.core.plan.fast_call_eras`) instead of two or three
            ext_proc round trips. The default, both eras, is the safe choice for
            a stage that is unsure; a stage that decides calls from the request
            (and sets headers at most) declares ``frozenset()``. A stage whose
            answer depends on its configuration overrides
            :meth:`eras_needing_ext_proc` instead.

    Instance attributes:
        config: the validated configuration.
        failure_mode: what a fault in a hook does (closed by default;
            configurable per stage with the ``failureMode`` key).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    requires: ClassVar[tuple[str, ...]] = ()
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset({"legacy", "modern"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):
            args: tuple[Any, ...] = getattr(base, "__args__", ())
            if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], StageConfig):
                cls.Config = args[0]
                return

    def __init__(self, config: C, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        self.config: C = config
        self.failure_mode = failure_mode

    @classmethod
    def eras_needing_ext_proc(cls, config: C) -> frozenset[str]:
        """The eras whose ``tools/call`` this stage needs ext_proc for, with ``config``.

        Decided from the class and the validated configuration alone, so that a
        renderer can tell without building the stage. The default is
        :attr:`calls_need_ext_proc`.
        """
        return cls.calls_need_ext_proc

    @classmethod
    def max_request_bytes(cls, config: C) -> int | None:
        """The largest request body this stage accepts with ``config``, if it limits it.

        Envoy buffers request bodies up to the largest limit any stage names. ``None``
        (the default): this stage sets no limit.
        """
        return None

    async def startup(self) -> None:
        """Called once before the server takes traffic (open stores, clients)."""

    async def shutdown(self) -> None:
        """Called once after the server stopped taking traffic."""

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        """Called once by the pipeline with the process's Prometheus registry.

        A stage that publishes metrics creates them on ``registry`` here (label
        values must be bounded and never carry tokens or secrets).
        """

    async def on_exchange_end(self, ctx: Context) -> None:
        """Called once when Envoy ends the exchange's ext_proc stream.

        That is when the HTTP stream finished or was reset, provided Envoy still
        had phases to send us (e.g. a response body the stage asked for with
        :meth:`Context.want_response_body`); otherwise Envoy ends the ext_proc
        stream as soon as the last phase it needs was answered. Keep it quick: it
        runs as the stream is torn down. Exceptions are logged, never raised.
        """

    def check(self, catalog: Catalog) -> list[str]:
        """Problems this stage finds in ``catalog`` (e.g. a Rego syntax error), as messages.

        ``mcp-extproc check`` prints them, and a reload whose catalog has any is
        refused (the last good catalog stays). A message starting with
        ``warning:`` is printed but refuses nothing. Must be fast and do no I/O.
        """
        return []

    def report(self) -> Mapping[str, Any] | None:
        """What this stage observed, for the controller to write into resources' status.

        ``serve --report`` serves every stage's report at ``/report`` (:mod:`extproc.core.report`);
        the ``pins`` stage reports each tool's pin and last definition, the ``virtual``
        stage each backend's tool count and name conflicts. Return JSON values only
        (``None``: nothing to report, the default). Runs on the event loop between
        exchanges, so it may read the stage's state as is; keep it quick and do no I/O.
        """
        return None

    def needs_response(self, ctx: Context) -> bool | None:
        """After the request headers: must Envoy send this exchange's response?

        Only consulted for stages that override a response hook. Return
        ``False`` when the request headers prove this stage will not read the
        response, ``True`` when it will, and ``None`` (the default) when it
        cannot tell yet.
        """
        return None

    async def on_request_headers(self, ctx: Context) -> Verdict:
        """The request headers are in ``ctx``; the body (if any) is not yet."""
        return None

    async def on_request_body(self, ctx: Context) -> Verdict:
        """The whole request body is in ``ctx.body`` (buffered, size-limited)."""
        return None

    async def on_response_headers(self, ctx: Context) -> Verdict:
        """The upstream's status and headers are in ``ctx``."""
        return None

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        """A piece of the response body (the whole body unless streamed).

        Return ``Continue(body=...)`` to replace *this chunk*. For streams,
        hold back incomplete events in :meth:`Context.state` and emit them
        with a later chunk; ``ctx.end_of_stream`` marks the last one.
        """
        return None
