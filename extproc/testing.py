"""The stage test harness: run a stage in a real pipeline, in process, as the ext_proc front door would.

No Envoy, no gRPC, no server. :class:`StageHarness` builds an
:class:`~extproc.core.pipeline.Pipeline` of the stage under test and the installed
stages it names (``requires`` is checked as in production), then plays one exchange
phase by phase with the front door's rules::

    post/get/delete(body, headers) ──▶ new_context (header lines, server, catalog)
        ──▶ run(REQUEST_HEADERS) ──Deny/Answer──▶ ExchangeResult.stop (upstream sees nothing)
        ──▶ run(REQUEST_BODY)      only with a body, and only if a stage reads bodies
        ──▶ audit line + metrics, as the front door records the decision
        ──▶ ExchangeResult: verdicts, headers_set/removed, body_forwarded, metadata
    result.respond(status, headers, body | chunks)   only if a stage reads responses
        ──▶ run(RESPONSE_HEADERS)
        ──▶ run(RESPONSE_BODY)     only if a stage called ctx.want_response_body():
                                   whole (JSON, or SSE with a Content-Length), else
                                   chunk by chunk (ctx.end_of_stream on the last)
        ──▶ Reply: what the agent receives (status, headers, body)

Example::

    from extproc.testing import StageHarness

    async def test_refuses_delete() -> None:
        harness = StageHarness(DenyDelete(DenyDeleteConfig()), stages_before=["mcp"])
        result = await harness.post(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete", "arguments": {}}}
        )
        assert result.denied
        assert result.deny is not None and result.deny.code == -32003  # `is not None`: for mypy
        assert result.reply is not None and result.reply.status == 200 and result.reply.json()["id"] == 1

``resources`` are the documents of ``resources.yaml`` (a YAML string, a list of
mappings, or a :class:`Catalog`); by default one ``MCPServer`` named ``demo`` that
allows every tool, reached at ``/demo/mcp``. ``async with harness:`` starts and stops
every stage. Stages without a ``startup`` (``mcp``, ``allowlist``, ``policy``,
``credentials`` with static bearers, and ``authn`` with no ``MCPAgent``) also work without it; ``authn``
with agents and ``external`` need it, and ``session`` needs it for idle expiry.
:meth:`StageHarness.check` and :meth:`StageHarness.fast_call` run the request side as
the ext_authz front doors do (:func:`extproc.frontdoor.decision.decide`).

Only tests may import this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, TypedDict

import yaml

from extproc.api import Answer, Context, Continue, Deny, FrontDoor, Phase, Stage, Stop
from extproc.config.pipeline_file import StageSpec
from extproc.config.resources import API_VERSION, Catalog, parse_documents, reference_problems
from extproc.core.audit import decision_of, record
from extproc.core.exchange import Mutations, answer_of, first_values, new_context
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.frontdoor.decision import decide
from extproc.mcp import headers as h
from extproc.mcp.spec import MODERN_PROTOCOL_VERSIONS, PROTOCOL_VERSION_META_KEY

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DEFAULT_RESOURCES", "ExchangeResult", "Reply", "RequestOptions", "StageHarness"]

StageLike: TypeAlias = "str | StageSpec | Stage[Any]"
"""An installed stage's name, a pipeline-file entry (name and config), or a built stage."""
Headers: TypeAlias = "Mapping[str, str] | Iterable[tuple[str, str]]"
"""Request headers as a mapping, or as header lines (to send one twice)."""
Outcome: TypeAlias = Continue | Stop
"""A phase's merged verdict: carry on (with mutations), or the stop."""


class RequestOptions(TypedDict, total=False):
    """How to send a request; every key is optional.

    Attributes:
        headers: request headers; ``content-type``, ``accept`` and ``content-length``
            default to what an MCP client sends.
        server: the server to send to (path ``/<server>/mcp``; default the harness's).
        path: the request path, instead of the server's.
        protocol_version: sends ``MCP-Protocol-Version``; for 2026-07-28 also the
            body's ``params._meta`` version and the ``Mcp-Method``/``Mcp-Name`` headers.
    """

    headers: Headers
    server: str
    path: str
    protocol_version: str


_DEMO = {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"]}
DEFAULT_RESOURCES: list[dict[str, Any]] = [
    {"apiVersion": API_VERSION, "kind": "MCPServer", "metadata": {"name": "demo"}, "spec": _DEMO}
]
"""The default catalog: one MCPServer ``demo`` that allows every tool."""


@dataclass(frozen=True)
class Reply:
    """What the agent receives: the upstream's response as the stages left it, or their stop.

    Attributes:
        status: the HTTP status.
        headers: the response headers (lower-case names).
        body: the body: the concatenation of the (possibly rewritten) chunks.
        stop: the Deny or Answer that produced this reply, if any.
        verdicts: the merged verdict of each response phase that ran (for a
            streamed body, that of the last chunk).
        chunks: each body chunk as forwarded to the agent.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes
    stop: Stop | None = None
    verdicts: Mapping[Phase, Outcome] = field(default_factory=dict)
    chunks: tuple[bytes, ...] = ()

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


def _stopped(stop: Stop, ctx: Context, verdicts: Mapping[Phase, Outcome] | None = None) -> Reply:
    body, headers = answer_of(stop, ctx.jsonrpc_id)
    return Reply(stop.status, headers, body, stop, dict(verdicts or {}), (body,))


class _Request(NamedTuple):
    pairs: tuple[tuple[str, str], ...]
    raw: bytes | None
    path: str


def _apply(headers: Mapping[str, str], outcome: Continue) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k not in outcome.remove_headers}
    return {**out, **outcome.set_headers}


@dataclass
class ExchangeResult:
    """The request side of one exchange, and the way to continue it with a response.

    Attributes:
        ctx: the exchange's Context, as the stages left it.
        verdicts: the merged :class:`Continue`, or the stop, of each request phase that ran
            (empty after a Check, which merges both phases).
        outcome: the request side's result: both phases' mutations merged, or the stop.
        body_forwarded: the body the upstream receives (``None`` when stopped).
        upstream_headers: the headers the upstream receives (no pseudo-headers; a
            rewritten body gets its new ``content-length``, as the front door sets it).
        response_phases: whether Envoy would send this exchange's response to the stages.
        ended: the ext_proc stream ended (``on_exchange_end`` ran): at once without
            response phases, else after the response.
        responded: :meth:`respond` ran.
        stop / deny / answer: the Deny or Answer that ended the exchange, if any.
        denied: True when a stage refused the request.
        reply: what the agent receives for a stop (a JSON-RPC error with the request's id).
        headers_set / headers_removed / metadata: the request side's header mutations
            and dynamic metadata (empty when stopped).
        wants_response_body: a stage called :meth:`Context.want_response_body`.
    """

    ctx: Context
    verdicts: dict[Phase, Outcome]
    outcome: Outcome
    body_forwarded: bytes | None
    upstream_headers: dict[str, str]
    response_phases: bool
    pipeline: Pipeline = field(repr=False)
    ended: bool = False
    responded: bool = False
    stop: Stop | None = field(init=False)
    deny: Deny | None = field(init=False)
    answer: Answer | None = field(init=False)
    denied: bool = field(init=False)
    reply: Reply | None = field(init=False)
    headers_set: Mapping[str, str] = field(init=False)
    headers_removed: tuple[str, ...] = field(init=False)
    metadata: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        outcome = self.outcome
        self.stop = None if isinstance(outcome, Continue) else outcome
        self.deny = outcome if isinstance(outcome, Deny) else None
        self.answer = outcome if isinstance(outcome, Answer) else None
        self.denied = self.deny is not None
        self.reply = None if self.stop is None else _stopped(self.stop, self.ctx, self.verdicts)
        self.headers_set = outcome.set_headers if isinstance(outcome, Continue) else {}
        self.headers_removed = outcome.remove_headers if isinstance(outcome, Continue) else ()
        self.metadata = outcome.metadata if isinstance(outcome, Continue) else {}

    @property
    def wants_response_body(self) -> bool:
        """True when a stage called :meth:`Context.want_response_body`."""
        return self.ctx.book.wants_response_body

    async def end(self) -> None:
        """End the exchange's ext_proc stream (``on_exchange_end``) once; respond() calls it."""
        if not self.ended:
            self.ended = True
            await self.pipeline.end(self.ctx)

    async def respond(
        self,
        status: int = 200,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        chunks: Sequence[bytes] | None = None,
    ) -> Reply:
        """Continue the exchange with the upstream's response; return what the agent receives.

        Args:
            status: the upstream's HTTP status.
            headers: its headers (``content-type`` defaults to ``application/json``
                when there is a body; ``body`` gets a ``content-length``).
            body: the whole body, or
            chunks: the body as the upstream streams it (an SSE stream without
                ``content-length`` reaches the stages chunk by chunk).

        Raises:
            RuntimeError: the request was stopped (the upstream never saw it), or respond() ran already.
        """
        if self.stop is not None or self.responded:
            raise RuntimeError("this exchange was stopped or already answered: there is no response to send")
        self.responded = True
        pieces = list(chunks) if chunks is not None else ([body] if body else [])
        sent = {k.lower(): v for k, v in (headers or {}).items()}
        if pieces:
            sent.setdefault(h.CONTENT_TYPE, "application/json")
        if chunks is None and body:
            sent.setdefault(h.CONTENT_LENGTH, str(len(body)))
        try:
            return await self._respond(status, sent, pieces)
        finally:
            await self.end()

    async def _respond(self, status: int, sent: dict[str, str], pieces: list[bytes]) -> Reply:
        if not self.response_phases:
            return Reply(status, sent, b"".join(pieces), chunks=tuple(pieces))
        ctx, run = self.ctx, self.pipeline.run
        ctx.response_headers = first_values(((":status", str(status)), *sent.items()))
        ctx.response_status = status
        ctx.book.response_streamed = ctx.response_is_sse and h.CONTENT_LENGTH not in ctx.response_headers
        ctx.end_of_stream = not pieces
        verdicts: dict[Phase, Outcome] = {Phase.RESPONSE_HEADERS: await run(Phase.RESPONSE_HEADERS, ctx)}
        outcome = verdicts[Phase.RESPONSE_HEADERS]
        if not isinstance(outcome, Continue):
            return _stopped(outcome, ctx, verdicts)
        sent = _apply(sent, outcome)
        if not (ctx.book.wants_response_body and pieces and self.pipeline.needs.response_body):
            return Reply(status, sent, b"".join(pieces), None, verdicts, tuple(pieces))
        streamed = ctx.book.response_streamed
        if not streamed:
            pieces = [b"".join(pieces)]  # buffered: Envoy sends the body once, whole
        out: list[bytes] = []
        for index, piece in enumerate(pieces):
            ctx.end_of_stream = index == len(pieces) - 1
            outcome = verdicts[Phase.RESPONSE_BODY] = await run(Phase.RESPONSE_BODY, ctx, piece)
            if not isinstance(outcome, Continue):
                return _stopped(outcome, ctx, verdicts)
            out.append(piece if outcome.body is None else outcome.body)
            if not streamed:  # header mutations reach the agent only before a buffered body
                sent = _apply(sent, outcome)
                if outcome.body is not None:
                    sent[h.CONTENT_LENGTH] = str(len(outcome.body))
        return Reply(status, sent, b"".join(out), None, verdicts, tuple(out))


def _catalog(resources: str | Sequence[Mapping[str, Any]] | Catalog | None) -> Catalog:
    if isinstance(resources, Catalog):
        return resources
    if isinstance(resources, str):
        resources = list(yaml.safe_load_all(resources))
    catalog = parse_documents(resources if resources is not None else DEFAULT_RESOURCES, "harness resources")
    if problems := reference_problems(catalog):
        raise ConfigError("harness resources: " + "; ".join(problems))
    return catalog


def _built(stage: StageLike, registry: Registry) -> Stage[Any]:
    if isinstance(stage, Stage):
        return stage
    return registry.build(stage if isinstance(stage, StageSpec) else StageSpec(name=stage))


def _encode(body: object) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()


def _modern(body: object, version: str) -> tuple[object, dict[str, str]]:
    """A 2026-07-28 request: ``params._meta``'s version, and Mcp-Method / Mcp-Name mirrored."""
    if not (isinstance(body, dict) and isinstance(method := body.get("method"), str)):
        return body, {}
    params = dict(body.get("params") or {})
    params["_meta"] = {PROTOCOL_VERSION_META_KEY: version, **(params.get("_meta") or {})}
    mirrored = {h.MCP_METHOD: method}
    if (key := h.NAME_BEARING_METHODS.get(method)) is not None and isinstance(params.get(key), str):
        mirrored[h.MCP_NAME] = params[key]
    return {**body, "params": params}, mirrored


class StageHarness:
    """One stage in a real pipeline, with the stages it needs; see the module docstring.

    Args:
        stage: the stage under test (built: ``MyStage(MyConfig(...))``).
        stages_before: stages that run before it, e.g. ``["mcp"]``.
        stages_after: stages that run after it.
        resources: the catalog's documents; default :data:`DEFAULT_RESOURCES`.
        server: the server requests go to by default (the catalog's first).

    Raises:
        PluginError: a stage's ``requires`` are not before it, or a name is not installed.
        ConfigError: a stage's configuration or a resource document is invalid.
    """

    def __init__(
        self,
        stage: Stage[Any],
        *,
        stages_before: Sequence[StageLike] = (),
        stages_after: Sequence[StageLike] = (),
        resources: str | Sequence[Mapping[str, Any]] | Catalog | None = None,
        server: str | None = None,
    ) -> None:
        registry = Registry()
        self.stage = stage
        self.pipeline = Pipeline(
            [*(_built(s, registry) for s in stages_before), stage, *(_built(s, registry) for s in stages_after)]
        )
        self.catalog = _catalog(resources)
        self.server = server or next(iter(self.catalog.servers), None)

    async def __aenter__(self) -> StageHarness:
        await self.pipeline.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pipeline.shutdown()

    async def post(self, body: object, **options: Unpack[RequestOptions]) -> ExchangeResult:
        """POST ``body`` (a JSON value, or ``bytes``/``str`` as is); see :meth:`request`."""
        return await self.request("POST", body, **options)

    async def get(self, **options: Unpack[RequestOptions]) -> ExchangeResult:
        """GET (the agent's SSE stream); see :meth:`request`."""
        return await self.request("GET", None, **options)

    async def delete(self, **options: Unpack[RequestOptions]) -> ExchangeResult:
        """DELETE (the end of a session); see :meth:`request`."""
        return await self.request("DELETE", None, **options)

    async def request(self, method: str, body: object = None, **options: Unpack[RequestOptions]) -> ExchangeResult:
        """Run the request side through the ext_proc front door's phases (``options``: :class:`RequestOptions`)."""
        sent = self._lines(method, body, options)
        ctx = new_context(self.catalog, sent.pairs, server_hint=options.get("server"), front_door=FrontDoor.EXT_PROC)
        ctx.request_has_body = bool(sent.raw)
        pipeline, merged = self.pipeline, Mutations()
        verdicts: dict[Phase, Outcome] = {}
        outcome = verdicts[Phase.REQUEST_HEADERS] = await pipeline.run(Phase.REQUEST_HEADERS, ctx)
        responds = pipeline.needs.response and pipeline.needs_response(ctx)
        if isinstance(outcome, Continue):
            merged.add(outcome)
            if ctx.request_has_body and pipeline.needs.request_body:
                ctx.body = sent.raw or b""
                outcome = verdicts[Phase.REQUEST_BODY] = await pipeline.run(Phase.REQUEST_BODY, ctx)
                if isinstance(outcome, Continue):
                    merged.add(outcome)
        result = self._result(
            ctx, verdicts, merged.result() if isinstance(outcome, Continue) else outcome, sent, responds
        )
        stop = result.stop
        record(
            pipeline.metrics, ctx, "allow" if stop is None else decision_of(stop), "" if stop is None else stop.reason
        )
        if stop is not None or not responds:
            await result.end()
        return result

    async def check(
        self, body: object = None, *, method: str = "POST", **options: Unpack[RequestOptions]
    ) -> ExchangeResult:
        """The request side as one ext_authz ``Check`` (front door ``ext_authz``): no response phases."""
        return await self._decide(method, body, None, options)

    async def fast_call(
        self, body: object, *, era: str = "legacy", **options: Unpack[RequestOptions]
    ) -> ExchangeResult:
        """A ``tools/call`` on the ``auto`` front door's fast route (one ``Check``) for ``era``.

        Raises:
            ValueError: this pipeline's ``tools/call`` of ``era`` would not take the fast route.
        """
        if era not in self.pipeline.fast_call_eras:
            raise ValueError(f"no fast route for {era}-era tools/call: a stage of {self.pipeline.names} needs ext_proc")
        return await self._decide("POST", body, era, options)

    async def _decide(self, method: str, body: object, era: str | None, options: RequestOptions) -> ExchangeResult:
        sent = self._lines(method, body, options)
        ctx, outcome = await decide(
            self.pipeline, self.catalog, pairs=sent.pairs, method=method, path=sent.path, body=sent.raw or b"",
            server_hint=options.get("server"), promised_era=era,
        )  # fmt: skip
        result = self._result(ctx, {}, outcome, sent, False)
        result.ended = True  # a Check has no ext_proc stream to end
        return result

    def _lines(self, method: str, body: object, options: RequestOptions) -> _Request:
        """The request's header lines (pseudo-headers first), its raw body and its path."""
        extra: dict[str, str] = {}
        if (version := options.get("protocol_version")) is not None:
            extra[h.MCP_PROTOCOL_VERSION] = version
            if version in MODERN_PROTOCOL_VERSIONS:
                body, mirrored = _modern(body, version)
                extra.update(mirrored)
        raw = _encode(body)
        path = options.get("path") or f"/{options.get('server') or self.server}/mcp"
        headers = options.get("headers") or ()
        given = [(k.lower(), v) for k, v in (headers.items() if isinstance(headers, Mapping) else headers)]
        defaults = {"accept": "text/event-stream" if method == "GET" else "application/json, text/event-stream"}
        if raw is not None:
            defaults |= {h.CONTENT_TYPE: "application/json", h.CONTENT_LENGTH: str(len(raw))}
        names = {k for k, _ in given}
        lines = [(":method", method), (":path", path), *given]
        lines += [(k, v) for k, v in {**defaults, **extra}.items() if k not in names]
        return _Request(tuple(lines), raw, path)

    def _result(
        self, ctx: Context, verdicts: dict[Phase, Outcome], final: Outcome, sent: _Request, responds: bool
    ) -> ExchangeResult:
        forwarded, upstream = None, {k: v for k, v in first_values(sent.pairs).items() if not k.startswith(":")}
        if isinstance(final, Continue):
            forwarded, upstream = (sent.raw or b"") if final.body is None else final.body, _apply(upstream, final)
            if final.body is not None:  # the front door fixes a rewritten body's length
                upstream[h.CONTENT_LENGTH] = str(len(final.body))
        return ExchangeResult(ctx, verdicts, final, forwarded, upstream, responds, self.pipeline)
