"""Traces through real Envoy and ``mcp-extproc up --otel``, into a collector stand-in on loopback.

    agent (traceparent) ──▶ Envoy (its OpenTelemetry tracer) ──▶ extension server ──▶ MCP server
                                 │ spans                           │ spans              (records
                                 ▼ OTLP/HTTP                       ▼ OTLP/HTTP           every header)
                            tests.upstreams.otlp_collector (the opentelemetry-proto messages)

No OpenTelemetry Collector binary can be installed here; the stand-in decodes what both
exporters send with the Collector's own protobuf messages and records every span. Real:
Envoy 1.40, ``up``, the SDK's MCP servers, a JWT agent (authn fetches a JWKS), a token
endpoint (the credentials stage fetches a token), embedded Rego, the heartbeating server
the session keeper answers.

The second setup is ``serve --otel`` (OTLP/gRPC) behind an Envoy rendered without
``--otel``: an Envoy that does not trace, where the upstream's parent is our span.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp_types import PaginatedRequestParams

from extproc.commands.envoy import envoy_binary
from extproc.tracing import session_digest
from tests.agents import BASE_HEADERS, LEGACY_VERSION, legacy_session, modern_request, raw_post, response_messages
from tests.idp import Idp, agent_doc, running_idp
from tests.integration.conftest import start_gateway
from tests.procs import (
    Proc,
    admin_ready,
    assert_envoy_accepts,
    free_port,
    start_collector,
    start_pyserver,
    start_ready_server,
)
from tests.upstreams.otlp_collector import SpanRecord, read_spans
from tests.upstreams.pyserver import Record, read_records

pytestmark = pytest.mark.integration

CLIENT_SECRET = "gw-client-s3cret-never-in-a-span"
REGO = "package mcp\nimport rego.v1\ndefault allow := true\n"
ENVOY = "mcp-extproc-envoy"
OURS = "mcp-extproc"
FAST_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
"""Our exporter sends every 100 ms (the tests wait for spans); Envoy's flushes every 5 s."""


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


@dataclass
class Setup:
    base: str
    spans_file: Path
    records: dict[str, Path]
    idp: Idp
    token_url: str
    gateway: Proc
    session_ids: list[str] = field(default_factory=list)
    """Agent-facing session ids seen by the tests, none of which a span may hold."""

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def token(self) -> str:
        return self.idp.mint(sub="alice")

    def received(self, server: str) -> list[Record]:
        return read_records(self.records[server])

    def spans(self) -> list[SpanRecord]:
        return read_spans(self.spans_file)

    def wait(self, found: Callable[[list[SpanRecord]], Any], what: str, deadline_s: float = 20.0) -> Any:
        """Poll the collector's record until ``found`` returns something truthy."""
        end = time.monotonic() + deadline_s
        while True:
            result = found(self.spans())
            if result:
                return result
            assert time.monotonic() < end, f"no {what} within {deadline_s}s; spans: {[s['name'] for s in self.spans()]}"
            time.sleep(0.1)


def _server(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": url, "allowedTools": ["echo", "add"], "deniedTools": ["delete_*"], **spec},
    }


def documents(idp: Idp, ports: dict[str, int], token_url: str) -> list[dict[str, Any]]:
    grant = {
        "clientCredentials": {
            "tokenUrl": token_url,
            "clientId": "gateway",
            "clientSecretRef": {"name": "oauth-client", "key": "secret"},
            "audience": "aud-py",
        }
    }
    return [
        _server("py", f"http://127.0.0.1:{ports['py']}/mcp", upstreamAuth=grant),
        _server("modern", f"http://127.0.0.1:{ports['modern']}/mcp"),
        _server("hb", f"http://127.0.0.1:{ports['hb']}/mcp"),
        agent_doc("agent", idp.jwks_uri, ["py", "modern", "hb"]),
        {
            "apiVersion": "mcp.extproc.io/v1alpha1",
            "kind": "MCPToolPolicy",
            "metadata": {"name": "py-rego"},
            "spec": {"targetRefs": [{"kind": "MCPServer", "name": "py"}], "rego": {"module": REGO}},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "oauth-client"},
            "stringData": {"secret": CLIENT_SECRET},
        },
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("tracing")
    procs: list[Proc] = []
    with running_idp() as idp, pytest.MonkeyPatch.context() as env:
        try:
            spans = tmp / "spans.jsonl"
            collector, http_port, _ = start_collector(spans, log_dir=tmp)
            procs.append(collector)
            oauth, oauth_port = start_ready_server(
                "tests.upstreams.oauth_server", "--client", f"gateway:{CLIENT_SECRET}", name="oauth", log_dir=tmp
            )
            procs.append(oauth)
            heartbeat, hb_port = start_ready_server(
                "tests.upstreams.heartbeat", "--interval", "1", "--timeout", "3", name="heartbeat", log_dir=tmp
            )
            procs.append(heartbeat)
            records = {"py": tmp / "py.jsonl", "modern": tmp / "modern.jsonl"}
            py, py_port = start_pyserver("legacy-sse", records["py"])
            modern, modern_port = start_pyserver("modern", records["modern"])
            procs += [py, modern]
            token_url = f"http://127.0.0.1:{oauth_port}/token"
            resources = tmp / "resources.yaml"
            ports = {"py": py_port, "modern": modern_port, "hb": hb_port}
            resources.write_text(yaml.safe_dump_all(documents(idp, ports, token_url)))
            for key, value in FAST_ENV.items():
                env.setenv(key, value)
            gateway, base, _ = start_gateway(resources, tmp, "--otel", f"http://127.0.0.1:{http_port}")
            procs.append(gateway)
            yield Setup(base, spans, records, idp, token_url, gateway)
        finally:
            for proc in reversed(procs):
                proc.stop()


def chain(spans: list[SpanRecord], start: SpanRecord) -> list[SpanRecord]:
    """``start`` and its ancestors among ``spans``, nearest first."""
    by_id = {s["span_id"]: s for s in spans if s["trace_id"] == start["trace_id"]}
    found = [start]
    while found[-1]["parent_span_id"] in by_id:
        found.append(by_id[found[-1]["parent_span_id"]])
    return found


def ours(spans: list[SpanRecord], name: str, trace_id: str) -> SpanRecord | None:
    return next((s for s in spans if s["service"] == OURS and s["name"] == name and s["trace_id"] == trace_id), None)


def children(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return [s for s in spans if s["parent_span_id"] == parent["span_id"] and s["trace_id"] == parent["trace_id"]]


def test_a_tool_call_is_one_trace_from_the_agent_through_envoy_to_the_mcp_server(setup: Setup) -> None:
    trace_id, agent_span = os.urandom(16).hex(), os.urandom(8).hex()
    headers = {"authorization": f"Bearer {setup.token()}", "traceparent": traceparent(trace_id, agent_span)}

    async def agent() -> None:
        async with legacy_session(setup.url("py"), headers=headers) as session:
            result = await session.call_tool("echo", {"text": "traced"})
            assert not result.is_error

    asyncio.run(agent())

    def complete(spans: list[SpanRecord]) -> SpanRecord | None:
        call = ours(spans, "tools/call echo", trace_id)
        # Complete once the chain reaches the agent's span through Envoy's (flushed every 5 s).
        return call if call is not None and chain(spans, call)[-1]["parent_span_id"] == agent_span else None

    call = setup.wait(complete, "tools/call span under the agent's, through Envoy's")
    spans = setup.spans()
    attributes = call["attributes"]
    assert call["kind"] == "SERVER"
    assert re.fullmatch(r"[0-9a-f]{32}", attributes.pop("mcp.session.id"))
    assert {k: v for k, v in attributes.items() if k != "mcp_extproc.principal.issuer"} == {
        "network.transport": "tcp",
        "network.protocol.name": "http",
        "http.request.method": "POST",
        "mcp_extproc.front_door": "fast_call",
        "mcp.method.name": "tools/call",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "echo",
        "jsonrpc.request.id": str(attributes["jsonrpc.request.id"]),
        "mcp.protocol.version": LEGACY_VERSION,
        "mcp_extproc.server.name": "py",
        "enduser.id": "alice",
        "mcp_extproc.agent": "agent",
        "mcp_extproc.decision": "allow",
    }
    # Our span is a child of Envoy's authorization call, itself a child of Envoy's ingress
    # span, whose parent is the agent's.
    ancestors = chain(spans, call)[1:]
    assert [s["service"] for s in ancestors] == [ENVOY, ENVOY]
    assert ancestors[-1]["kind"] == "SERVER"
    # Every stage hook is a child of our span.
    hooks = {s["name"] for s in children(spans, call)}
    assert {"authn request_headers", "mcp request_body", "policy request_body", "credentials request_body"} <= hooks
    # The MCP server got the same trace: its parent is Envoy's span (Envoy traces, so it sets
    # the upstream's traceparent), which the collector has too.
    [received] = [r for r in setup.received("py") if (r["body"] or {}).get("method") == "tools/call"]
    upstream_trace, upstream_parent = received["headers"]["traceparent"].split("-")[1:3]
    assert upstream_trace == trace_id
    assert upstream_parent in {s["span_id"] for s in spans if s["service"] == ENVOY}


def test_fetches_and_rego_are_children_of_the_hooks_that_made_them(setup: Setup) -> None:
    trace_id = os.urandom(16).hex()
    headers = {"authorization": f"Bearer {setup.token()}", "traceparent": traceparent(trace_id, os.urandom(8).hex())}
    # A fresh gateway has fetched nothing yet only for the first test; fetch names are unique
    # per trace, so look in every trace of this module for them.
    asyncio.run(_legacy_call(setup, headers))
    spans = setup.wait(lambda s: [x for x in s if x["name"] == "rego evaluate" and x["trace_id"] == trace_id], "rego")
    spans = setup.spans()
    by_id = {s["span_id"]: s for s in spans}
    [rego] = [s for s in spans if s["name"] == "rego evaluate" and s["trace_id"] == trace_id]
    assert by_id[rego["parent_span_id"]]["name"] == "policy request_body"
    assert rego["attributes"]["mcp_extproc.rego.engine"] == "embedded"
    [token] = [s for s in spans if s["name"] == "token fetch"]  # cached afterwards: fetched once
    assert token["kind"] == "CLIENT"
    assert by_id[token["parent_span_id"]]["name"] == "credentials request_body"
    assert token["attributes"] == {
        "url.full": setup.token_url,
        "mcp_extproc.token.grant": "client_credentials",
        "http.response.status_code": 200,
    }
    [jwks] = [s for s in spans if s["name"] == "jwks fetch"]
    assert by_id[jwks["parent_span_id"]]["name"] == "authn request_headers"
    assert jwks["attributes"]["url.full"] == setup.idp.jwks_uri


async def _legacy_call(setup: Setup, headers: dict[str, str]) -> None:
    async with legacy_session(setup.url("py"), headers=headers) as session:
        await session.call_tool("add", {"a": 1, "b": 2})


def test_context_only_in_meta_joins_the_agents_trace(setup: Setup) -> None:
    trace_id, agent_span = os.urandom(16).hex(), os.urandom(8).hex()
    meta = {"traceparent": traceparent(trace_id, agent_span)}
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "m"}, "_meta": meta})
    reply = asyncio.run(raw_post(setup.url("modern"), body, {**headers, "authorization": f"Bearer {setup.token()}"}))
    assert reply.status_code == 200, reply.text
    call = setup.wait(lambda s: ours(s, "tools/call echo", trace_id), "tools/call span in the _meta trace")
    assert call["parent_span_id"] == agent_span
    # Envoy does not read _meta: it started a trace of its own, which our span links to.
    [link] = call["links"]
    assert link["trace_id"] != trace_id
    envoys = setup.wait(
        lambda s: [x for x in s if x["service"] == ENVOY and x["span_id"] == link["span_id"]], "Envoy's linked span"
    )
    assert envoys[0]["trace_id"] == link["trace_id"]
    # The MCP server reads _meta (SEP-414), which reached it untouched: the agent's trace.
    [received] = [r for r in setup.received("modern") if (r["body"] or {}).get("id") == body["id"]][-1:]
    assert received["body"]["params"]["_meta"]["traceparent"] == meta["traceparent"]
    # Its traceparent header is Envoy's (Envoy sets it on every request it traces).
    assert received["headers"]["traceparent"].split("-")[1] == link["trace_id"]


def test_a_denied_call_has_its_decision_and_reason_on_the_span(setup: Setup) -> None:
    trace_id = os.urandom(16).hex()
    body, headers = modern_request("tools/call", {"name": "delete_everything", "arguments": {}})
    headers = {
        **headers,
        "authorization": f"Bearer {setup.token()}",
        "traceparent": traceparent(trace_id, "0" * 15 + "1"),
    }
    reply = asyncio.run(raw_post(setup.url("modern"), body, headers))
    [message] = response_messages(reply)
    assert message["error"]["code"] == -32003
    denied = setup.wait(lambda s: ours(s, "tools/call delete_everything", trace_id), "the denied call's span")
    assert denied["attributes"]["mcp_extproc.decision"] == "deny"
    assert denied["attributes"]["mcp_extproc.reason"] == "tool_not_allowed"
    assert denied["attributes"]["rpc.response.status_code"] == denied["attributes"]["error.type"] == "-32003"
    assert denied["status"]["code"] == "ERROR"
    assert "delete_everything" in denied["status"]["message"]
    refusing = [s for s in children(setup.spans(), denied) if s["attributes"].get("mcp_extproc.verdict") == "deny"]
    assert [s["name"] for s in refusing] == ["allowlist request_body"]


def test_the_keepers_requests_are_root_spans_linked_to_the_session(setup: Setup) -> None:
    trace_id = os.urandom(16).hex()
    headers = {
        **BASE_HEADERS,
        "authorization": f"Bearer {setup.token()}",
        "traceparent": traceparent(trace_id, os.urandom(8).hex()),
    }
    params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "agent", "version": "0"}}
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
    reply = httpx.post(setup.url("hb"), content=json.dumps(initialize), headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    session = reply.headers["mcp-session-id"]
    headers.update({"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"})
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    note = httpx.post(setup.url("hb"), content=json.dumps(initialized), headers=headers, timeout=30)
    assert note.status_code == 202, note.text
    # The agent never opens the session's GET stream: the keeper does, and answers the pings.
    answers = setup.wait(lambda s: _keepers(s, "keeper ping answer", "hb"), "a ping answered by the keeper")
    agents = {s["span_id"] for s in setup.spans() if s["trace_id"] == trace_id}
    for answer in answers:
        assert answer["parent_span_id"] == "" and answer["trace_id"] != trace_id
        assert answer["links"][0]["span_id"] in agents
        assert answer["attributes"]["mcp_extproc.server.name"] == "hb"
    delete = httpx.delete(setup.url("hb"), headers=headers, timeout=30)
    assert delete.status_code in (200, 204), delete.text
    stream = setup.wait(lambda s: _keepers(s, "keeper stream", "hb"), "the keeper's GET stream, ended")
    assert stream[0]["links"] and stream[0]["links"][0]["span_id"] in agents
    setup.session_ids.append(session)


def _keepers(spans: list[SpanRecord], name: str, server: str) -> list[SpanRecord]:
    return [s for s in spans if s["name"] == name and s["attributes"].get("mcp_extproc.server.name") == server]


def test_no_span_carries_a_token_or_a_secret(setup: Setup) -> None:
    spans = setup.spans()
    assert len(spans) > 50
    text = json.dumps(spans)
    upstream_tokens = {r["headers"].get("authorization", "") for r in setup.received("py")} - {""}
    upstream_sessions = {r["headers"].get("mcp-session-id", "") for r in setup.received("py")} - {""}
    assert upstream_tokens and upstream_sessions
    for secret in [CLIENT_SECRET, *upstream_tokens, *upstream_sessions, *setup.session_ids]:
        assert secret.removeprefix("Bearer ") not in text
    assert session_digest(next(iter(upstream_sessions))) not in {s["attributes"].get("mcp.session.id") for s in spans}
    # No agent token either: each minted JWT starts with the same header, which no span holds.
    assert setup.token().split(".")[0] not in text
    # Envoy's spans name the path without its query.
    assert all("?" not in str(s["attributes"].get("http.url", "")) for s in spans)


# -- an Envoy that does not trace ---------------------------------------------------------------


@dataclass
class Untraced:
    url: str
    spans_file: Path
    record: Path


@pytest.fixture(scope="module")
def untraced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Untraced]:
    tmp = tmp_path_factory.mktemp("untraced")
    procs: list[Proc] = []
    with pytest.MonkeyPatch.context() as env:
        try:
            spans = tmp / "spans.jsonl"
            collector, _, grpc_port = start_collector(spans, log_dir=tmp)
            procs.append(collector)
            record = tmp / "py.jsonl"
            upstream, port = start_pyserver("legacy-sse", record)
            procs.append(upstream)
            resources = tmp / "resources.yaml"
            resources.write_text(yaml.safe_dump(_server("py", f"http://127.0.0.1:{port}/mcp")))
            grpc, authz = f"127.0.0.1:{free_port()}", tmp / "authz.sock"
            for key, value in {**FAST_ENV, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}.items():
                env.setenv(key, value)
            argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources), "--grpc", grpc]
            argv += ["--authz-http", str(authz), "--metrics", "", "--otel", f"127.0.0.1:{grpc_port}"]
            serve = Proc(argv, name="serve", log_dir=tmp)
            procs.append(serve)
            serve.wait_for_line(r"gRPC server listening", 30)
            env.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
            listen = free_port()
            render = [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources), "--grpc", grpc]
            render += ["--authz-http", str(authz), "--listen", f"127.0.0.1:{listen}"]
            render += ["--admin-socket", str(tmp / "admin.sock")]
            bootstrap = tmp / "envoy.yaml"
            assert_envoy_accepts(subprocess.run(render, capture_output=True, text=True, check=True).stdout, bootstrap)
            envoy = Proc([envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id"], name="envoy", log_dir=tmp)
            procs.append(envoy)
            deadline = time.monotonic() + 30
            while not admin_ready(tmp / "admin.sock"):
                assert envoy.popen.poll() is None and time.monotonic() < deadline, envoy.output()
                time.sleep(0.05)
            yield Untraced(f"http://127.0.0.1:{listen}/py/mcp", spans, record)
        finally:
            for proc in reversed(procs):
                proc.stop()


def _span(trace_id: str, span_id: str) -> Callable[[list[SpanRecord]], list[SpanRecord]]:
    return lambda spans: [s for s in spans if s["trace_id"] == trace_id and s["span_id"] == span_id]


def _wait_for(path: Path, found: Callable[[list[SpanRecord]], Any], what: str) -> Any:
    end = time.monotonic() + 20
    while not (result := found(read_spans(path))):
        assert time.monotonic() < end, f"no {what}"
        time.sleep(0.1)
    return result


def test_without_envoys_tracer_the_upstreams_parent_is_our_span(untraced: Untraced) -> None:
    header_trace, meta_trace = os.urandom(16).hex(), os.urandom(16).hex()

    async def agent() -> None:
        headers = {"traceparent": traceparent(header_trace, os.urandom(8).hex())}
        async with legacy_session(untraced.url, headers=headers) as session:
            await session.call_tool("echo", {"text": "header"})
        # A tools/list (ext_proc, whose request headers go out before the body is read)
        # and a tools/call (the fast route) carrying the context only in _meta.
        meta: Any = {"traceparent": traceparent(meta_trace, os.urandom(8).hex())}
        async with legacy_session(untraced.url) as session:
            await session.list_tools(params=PaginatedRequestParams(_meta=meta))
            await session.call_tool("echo", {"text": "m"}, meta=meta)

    asyncio.run(agent())
    records = read_records(untraced.record)
    for trace_id, method in ((header_trace, "tools/call"), (meta_trace, "tools/list"), (meta_trace, "tools/call")):
        [received] = [
            r
            for r in records
            if (r["body"] or {}).get("method") == method and trace_id in r["headers"].get("traceparent", "")
        ][:1]
        parent = received["headers"]["traceparent"].split("-")[2]
        found = _wait_for(untraced.spans_file, _span(trace_id, parent), f"our span {parent} of {method}")
        assert found[0]["service"] == OURS and found[0]["kind"] == "SERVER"
        assert found[0]["name"].startswith(method)
        assert found[0]["via"] == "grpc"
        if trace_id == meta_trace and method == "tools/list":
            # ext_proc: the request-headers hooks ran before the body named the parent; recorded,
            # they are children of the span all the same.
            spans = read_spans(untraced.spans_file)
            assert "authn request_headers" in {s["name"] for s in children(spans, found[0])}


def test_the_bootstrap_with_envoys_tracer_passes_envoys_validation(tmp_path: Path) -> None:
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(_server("py", "http://127.0.0.1:9/mcp")))
    for protocol, endpoint in (("grpc", "127.0.0.1:4317"), ("http/protobuf", "https://collector.example:4318")):
        argv = [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources), "--otel", endpoint]
        rendered = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol},
        ).stdout
        assert "envoy.tracers.opentelemetry" in rendered
        assert_envoy_accepts(rendered, tmp_path / f"envoy-{protocol.replace('/', '-')}.yaml")
