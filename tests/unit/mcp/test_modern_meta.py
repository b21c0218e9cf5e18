"""The ladder's per-request version rung: a 2026-07-28 request without ``_meta``'s version is -32602.

The 2026-07-28 specification ("Per-request protocol fields", basic/index): "A request
missing any required field is malformed; the server MUST reject it with JSON-RPC error
code -32602 (Invalid params). On HTTP, the response status MUST be 400 Bad Request."
The gateway checks the field it needs, ``io.modelcontextprotocol/protocolVersion`` (the
value the ``MCP-Protocol-Version`` header must mirror), and leaves the other,
``io.modelcontextprotocol/clientCapabilities``, to the upstream. A header that disagrees
with a version the body does carry stays a header mismatch (-32020, streamable HTTP
"Protocol Version Header"). The conformance suite's ``server-stateless`` scenario checks
both, and so does the SDK's server (``mcp.shared.inbound.classify_inbound_request``),
which these tests hold the codec to.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundLadderRejection,
    InboundModernRoute,
    classify_inbound_request,
)
from mcp_types import CLIENT_CAPABILITIES_META_KEY as CAPABILITIES
from mcp_types import CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY
from mcp_types.jsonrpc import HEADER_MISMATCH, INVALID_PARAMS

from extproc.mcp import Era, McpRequest, Rejection, http_status_for, parse_request
from tests.unit.mcp.bodies import LEGACY, MODERN, body, request


def full_meta(**extra: Any) -> dict[str, Any]:
    return {PROTOCOL_VERSION_META_KEY: MODERN, CAPABILITIES: {}, **extra}


def modern_headers(method: str, version: str = MODERN) -> dict[str, str]:
    return {"mcp-protocol-version": version, "mcp-method": method}


def accepted(raw: bytes, headers: dict[str, str]) -> McpRequest:
    result = parse_request(raw, headers)
    assert isinstance(result, McpRequest), result
    return result


def invalid_params(raw: bytes, headers: dict[str, str]) -> Rejection:
    result = parse_request(raw, headers)
    assert isinstance(result, Rejection), result
    assert (result.status, result.code) == (400, INVALID_PARAMS), result
    return result


def test_the_status_comes_from_the_codes_table_and_is_the_specs() -> None:
    r = invalid_params(body(request("server/discover", {})), modern_headers("server/discover"))
    assert r.status == http_status_for(INVALID_PARAMS) == ERROR_CODE_HTTP_STATUS[INVALID_PARAMS] == 400


@pytest.mark.parametrize(
    ("params", "said"),
    [
        (None, "has no params._meta"),
        ({}, "has no params._meta"),
        ({"_meta": None}, "params._meta as a JSON null"),
        ({"_meta": [MODERN]}, "params._meta as a JSON array"),
        ({"_meta": "2026-07-28"}, "params._meta as a JSON string"),
    ],
)
def test_a_modern_request_without_meta_is_invalid_params(params: dict[str, Any] | None, said: str) -> None:
    r = invalid_params(body(request("server/discover", params, id=101)), modern_headers("server/discover"))
    assert r.id == 101
    assert said in r.message and PROTOCOL_VERSION_META_KEY in r.message and MODERN in r.message


def test_meta_without_the_protocol_version_is_invalid_params_not_a_header_mismatch() -> None:
    # The conformance suite's probe: clientInfo and clientCapabilities, no protocolVersion.
    meta = {CLIENT_INFO_META_KEY: {"name": "conformance-client", "version": "1.0.0"}, CAPABILITIES: {}}
    r = invalid_params(body(request("server/discover", {"_meta": meta}, id=102)), modern_headers("server/discover"))
    assert r.id == 102
    assert f"params._meta has no {PROTOCOL_VERSION_META_KEY!r}" in r.message


def test_meta_with_the_version_and_nothing_else_is_left_to_the_upstream() -> None:
    # clientCapabilities is required too, but the gateway decides nothing on it: the SDK's
    # server answers its absence with -32602 itself.
    meta = {PROTOCOL_VERSION_META_KEY: MODERN}
    accepted(body(request("tools/list", {"_meta": meta}, id="c")), modern_headers("tools/list"))


def test_client_info_is_not_required() -> None:
    parsed = accepted(body(request("server/discover", {"_meta": full_meta()})), modern_headers("server/discover"))
    assert parsed.era is Era.MODERN and parsed.protocol_version == MODERN


def test_a_tools_call_without_meta_is_invalid_params_too() -> None:
    headers = {**modern_headers("tools/call"), "mcp-name": "echo"}
    r = invalid_params(body(request("tools/call", {"name": "echo", "arguments": {}}, id=7)), headers)
    assert r.id == 7 and "has no params._meta" in r.message


def test_a_version_the_body_carries_and_the_header_contradicts_is_still_a_header_mismatch() -> None:
    # The suite's HttpServerHeaderMismatch400 probe: header 2026-07-28, _meta v999.0.0.
    meta = full_meta(**{PROTOCOL_VERSION_META_KEY: "v999.0.0"})
    result = parse_request(body(request("server/discover", {"_meta": meta}, id=302)), modern_headers("server/discover"))
    assert isinstance(result, Rejection)
    assert (result.status, result.code, result.id) == (400, HEADER_MISMATCH, 302)


def test_a_modern_body_without_the_version_header_is_still_a_header_mismatch() -> None:
    # No modern header: the header is what is missing (-32020), whatever else the body lacks.
    meta = {PROTOCOL_VERSION_META_KEY: MODERN}
    result = parse_request(body(request("tools/list", {"_meta": meta})), {"mcp-method": "tools/list"})
    assert isinstance(result, Rejection)
    assert result.code == HEADER_MISMATCH and "MCP-Protocol-Version header is missing" in result.message


def test_notifications_need_no_meta() -> None:
    # The fields are required on requests; the SDK lets a notification without them through.
    note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    assert accepted(body(note), modern_headers("notifications/cancelled")).era is Era.MODERN


def test_legacy_requests_need_no_meta() -> None:
    for headers in ({}, {"mcp-protocol-version": LEGACY}):
        assert accepted(body(request("tools/list")), headers).era is Era.LEGACY


def test_an_unknown_version_header_is_left_to_the_upstream() -> None:
    # Not a revision the codec knows: the upstream answers (-32022 from the SDK), as before.
    accepted(body(request("tools/list")), modern_headers("tools/list", version="2099-01-01"))


meta_st = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.fixed_dictionaries(
        {},
        optional={
            PROTOCOL_VERSION_META_KEY: st.sampled_from([MODERN, LEGACY, "v999.0.0"]),
            CAPABILITIES: st.just({}),
            CLIENT_INFO_META_KEY: st.just({"name": "c", "version": "1"}),
            "progressToken": st.just(1),
        },
    ),
)
params_st = st.one_of(st.just({}), st.builds(lambda meta: {"_meta": meta}, meta_st))


@given(params_st, st.sampled_from(["tools/list", "server/discover", "prompts/list"]))
def test_the_codec_refuses_a_modern_request_as_the_sdks_server_does(params: dict[str, Any], method: str) -> None:
    meta = params.get("_meta")
    obj = request(method, params)
    headers = modern_headers(method)
    sdk = classify_inbound_request(obj, headers=headers)
    ours = parse_request(body(obj), headers)
    left_to_upstream = isinstance(meta, dict) and PROTOCOL_VERSION_META_KEY in meta and CAPABILITIES not in meta
    if isinstance(sdk, InboundLadderRejection) and not left_to_upstream:
        assert isinstance(ours, Rejection), (obj, sdk)
        assert ours.code == sdk.code and ours.status == ERROR_CODE_HTTP_STATUS[sdk.code]
    elif isinstance(ours, Rejection):
        # The one thing the codec leaves to the upstream: a version but no capabilities,
        # which the SDK refuses (-32602), unless the header contradicts the version first.
        assert left_to_upstream and ours.code == HEADER_MISMATCH, (obj, ours)
    else:
        assert isinstance(sdk, InboundModernRoute) or left_to_upstream, (obj, sdk)
