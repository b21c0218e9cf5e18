"""Upstreams receive an allow-list of the agent's headers, on every front door; credentials never.

Data flow: the ``mcp`` and ``credentials`` stages in a :class:`~extproc.testing.StageHarness`,
played as each front door plays them (ext_proc phases for POST and GET, one ext_authz
``Check``, the ``auto`` front door's fast ``tools/call``). The harness applies the merged
mutations to what the agent sent, exactly as Envoy would, and ``upstream_headers`` is what
the MCP server receives. Before the fix only ``Authorization`` (and ``removeHeaders``)
was removed, so ``Cookie``, ``Proxy-Authorization``, ``X-Api-Key`` and the rest reached the
upstream. Also here: ``spec.forwardHeaders`` is validated the same by the model and by the
CRD, and a hypothesis property over random credential-looking headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.config.models import MCPServer
from extproc.config.pipeline_file import StageSpec
from extproc.config.resources import API_VERSION
from extproc.core.registry import Registry
from extproc.testing import ExchangeResult, StageHarness
from plugins.credentials import FORWARDED_HEADERS
from tests.kubeschemas import cel_violations, crd_schema, load_crd, openapi_schema

UPSTREAM = "Bearer upstream-token"
CREDENTIAL_HEADERS = {
    "cookie": "session=agent-cookie",
    "proxy-authorization": "Basic YWdlbnQ6cHc=",
    "x-api-key": "agent-api-key",
    "x-auth-token": "agent-auth-token",
    "x-forwarded-authorization": "Bearer forwarded-agent-token",
    "authentication": "agent-authentication",
    "x-custom": "anything-else",
}
MCP_HEADERS = {
    "mcp-session-id": "s-1",
    "mcp-protocol-version": "2025-06-18",
    "mcp-param-region": "eu",  # 2026-07-28: mirrors a call's argument; the server checks it
    "last-event-id": "41",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=1",
    "baggage": "k=v",
    "user-agent": "agent/1.0",
    "origin": "http://127.0.0.1",
}
CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
CRD = Path(__file__).resolve().parents[3] / "deploy" / "crds" / "mcp.extproc.io_mcpservers.yaml"


def _resources(forward: list[str] | None = None) -> list[dict[str, Any]]:
    spec: dict[str, Any] = {
        "url": "http://127.0.0.1:9/mcp",
        "allowedTools": ["*"],
        "upstreamAuth": {"bearer": {"secretRef": {"name": "up", "key": "token"}}},
    }
    if forward is not None:
        spec["forwardHeaders"] = forward
    server = {"apiVersion": API_VERSION, "kind": "MCPServer", "metadata": {"name": "demo"}, "spec": spec}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "up"}}
    return [server, {**secret, "stringData": {"token": "upstream-token"}}]


def _harness(forward: list[str] | None = None, **config: Any) -> StageHarness:
    credentials = Registry().build(StageSpec(name="credentials", config=config))
    return StageHarness(credentials, stages_before=["mcp"], resources=_resources(forward))


Door = Callable[[StageHarness, Any], Coroutine[Any, Any, ExchangeResult]]
DOORS: dict[str, Door] = {
    "ext_proc POST": lambda h, headers: h.post(CALL, headers=headers),
    "ext_proc GET": lambda h, headers: h.get(headers=headers),
    "ext_authz check": lambda h, headers: h.check(CALL, headers=headers),
    "auto fast call": lambda h, headers: h.fast_call(CALL, headers=headers),
}


@pytest.mark.parametrize("door", DOORS)
async def test_only_the_allow_list_and_forward_headers_reach_the_upstream(door: str) -> None:
    agent = {"authorization": "Bearer agent-token", **CREDENTIAL_HEADERS, **MCP_HEADERS, "x-tenant": "t-7"}
    result = await DOORS[door](_harness(["X-Tenant"]), agent)
    assert result.stop is None, result.reply
    upstream = result.upstream_headers
    for name in CREDENTIAL_HEADERS:
        assert name not in upstream, f"{name} reached the upstream"
    assert {name: upstream.get(name) for name in MCP_HEADERS} == MCP_HEADERS
    assert upstream["x-tenant"] == "t-7"  # named in forwardHeaders
    assert upstream["authorization"] == UPSTREAM
    assert upstream["accept"] and (door == "ext_proc GET" or upstream["content-type"] == "application/json")


@pytest.mark.parametrize("door", [d for d in DOORS if d != "ext_proc GET"])
async def test_the_gateways_own_x_mcp_headers_survive_and_spoofed_ones_do_not(door: str) -> None:
    spoofed = {"x-mcp-tool": "delete_everything", "x-mcp-method": "initialize", "x-mcp-server": "other"}
    result = await DOORS[door](_harness(), spoofed)
    derived = {name: result.upstream_headers.get(name) for name in spoofed}
    assert derived == {"x-mcp-tool": "echo", "x-mcp-method": "tools/call", "x-mcp-server": "demo"}


async def test_remove_headers_still_removes_allowed_and_forwarded_headers() -> None:
    harness = _harness(["x-tenant"], removeHeaders=["User-Agent", "X-Tenant"])
    result = await harness.post(CALL, headers={"user-agent": "agent/1.0", "x-tenant": "t", "accept": "*/*"})
    assert "user-agent" not in result.upstream_headers and "x-tenant" not in result.upstream_headers
    assert result.upstream_headers["accept"] == "*/*"


async def test_without_upstream_auth_the_headers_are_still_dropped() -> None:
    credentials = Registry().build(StageSpec(name="credentials"))
    harness = StageHarness(credentials, stages_before=["mcp"])  # the default server: no upstreamAuth
    for result in (await harness.post(CALL, headers=CREDENTIAL_HEADERS), await harness.get(headers=CREDENTIAL_HEADERS)):
        assert not set(CREDENTIAL_HEADERS) & set(result.upstream_headers)


# -- forwardHeaders: the model and the CRD -------------------------------------------------


def _crd_accepts(doc: dict[str, Any]) -> bool:
    crd = load_crd(CRD)
    try:
        jsonschema.Draft4Validator(crd_schema(crd, "v1alpha1")).validate(doc)
    except jsonschema.ValidationError:
        return False
    return not cel_violations(openapi_schema(crd, "v1alpha1"), doc)


@pytest.mark.parametrize(
    ("names", "accepted"),
    [
        (["X-Tenant", "cookie", "x-b3-traceid"], True),
        (["Authorization"], False),
        (["x-mcp-tool"], False),
        (["X-MCP-Server"], False),
        (["bad header"], False),
        ([""], False),
        (["x-tenant:"], False),
    ],
)
def test_forward_headers_are_http_names_and_never_ours(names: list[str], accepted: bool) -> None:
    doc = _resources(names)[0]
    try:
        server = MCPServer.model_validate(doc)
    except ValidationError:
        model_ok = False
    else:
        model_ok = True
        assert server.spec.forward_headers == [n.lower() for n in names]
    assert model_ok is accepted
    assert _crd_accepts(doc) is accepted


# -- the property ----------------------------------------------------------------------------

_WORDS = ["auth", "authorization", "authentication", "token", "key", "api-key", "apikey", "cookie", "session"]
_WORDS += ["secret", "password", "credential", "bearer", "jwt", "signature", "access-token", "client-secret"]
_credential_name = st.builds(
    lambda prefix, word, suffix: prefix + word + suffix,
    st.sampled_from(["", "x-", "proxy-", "x-forwarded-", "x-original-", "x-upstream-", "x-amz-", "set-"]),
    st.sampled_from(_WORDS),
    st.sampled_from(["", "-id", "-token", "-value", "s", "-1", "2"]),
)
_any_name = st.from_regex(r"[a-z0-9!#$%&'*+.^_`|~-]{1,16}", fullmatch=True)


def _not_exempt(name: str) -> bool:
    """Envoy's own (``x-envoy-*``) are Envoy's to keep or drop; allow-listed, MCP's (``mcp-*``) and
    ``x-mcp-*`` are not credentials."""
    return not name.startswith(("x-envoy-", "x-mcp-", "mcp-")) and name not in FORWARDED_HEADERS


def _recase(name: str, upper: list[bool]) -> str:
    return "".join(c.upper() if u else c for c, u in zip(name, upper, strict=False))


_name = st.one_of(_credential_name, _credential_name, _any_name).filter(_not_exempt)
_cased = st.builds(_recase, _name, st.lists(st.booleans(), min_size=16, max_size=16))
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sent=st.lists(st.tuples(_cased, _value), min_size=1, max_size=8),
    forwarded=st.lists(_name, max_size=3),
    door=st.sampled_from(sorted(DOORS)),
)
def test_credential_looking_headers_never_survive_unless_forwarded(
    sent: list[tuple[str, str]], forwarded: list[str], door: str
) -> None:
    forward = [n for n in forwarded if n != "authorization"]
    # Some of the sent names are the forwarded ones, so both branches are exercised.
    sent = sent + [(name, f"forwarded-{i}") for i, name in enumerate(forward[:1])]
    harness = _harness(forward)
    result = asyncio.run(DOORS[door](harness, sent))
    assert result.stop is None, result.reply
    upstream = result.upstream_headers
    first: dict[str, str] = {}
    for name, value in sent:
        first.setdefault(name.lower(), value)
    for name, value in first.items():
        if name == "authorization":
            assert upstream[name] == UPSTREAM
        elif name in forward:
            assert upstream.get(name) == value
        else:
            assert name not in upstream, f"{name!r} survived on {door}"
