"""The MCP request ladder, JSON-RPC messages and error bodies, and the header codec."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.inbound import decode_header_value as sdk_decode_header_value
from mcp.shared.inbound import encode_header_value
from mcp_types import PROTOCOL_VERSION_META_KEY
from mcp_types.jsonrpc import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR

from extproc.mcp import (
    DERIVED_HEADERS,
    ROUTING_HEADERS,
    Era,
    McpRequest,
    Rejection,
    decode_header_value,
    encode_error,
    error_object,
    find_duplicated_routing_header,
    header_hints,
    parse_message,
    parse_request,
)
from tests.unit.mcp.bodies import LEGACY, MODERN, body, request


def call(name: str, arguments: dict[str, Any] | None = None, id: Any = 1) -> dict[str, Any]:
    return request("tools/call", {"name": name, "arguments": arguments or {}}, id)


def modern(method: str, params: dict[str, Any] | None = None, id: Any = 1) -> dict[str, Any]:
    meta = {PROTOCOL_VERSION_META_KEY: MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    return request(method, {**(params or {}), "_meta": meta}, id)


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    headers = {"mcp-protocol-version": MODERN, "mcp-method": method}
    if name is not None:
        headers["mcp-name"] = encode_header_value(name)
    return headers


def accepted(raw: bytes, headers: dict[str, str] | None = None) -> McpRequest:
    result = parse_request(raw, headers or {})
    assert isinstance(result, McpRequest), result
    return result


def rejected(raw: bytes, headers: dict[str, str] | None = None, **kwargs: Any) -> Rejection:
    result = parse_request(raw, headers or {}, **kwargs)
    assert isinstance(result, Rejection), result
    return result


# Rung 1: size


def test_a_body_over_the_limit_is_413_naming_both_sizes() -> None:
    raw = body(call("echo", {"text": "x" * 100}))
    r = rejected(raw, max_bytes=len(raw) - 1)
    assert (r.status, r.code, r.id) == (413, INVALID_REQUEST, None)
    assert f"{len(raw)} bytes" in r.message and f"{len(raw) - 1}-byte limit" in r.message
    assert isinstance(parse_request(raw, {}, max_bytes=len(raw)), McpRequest)


# Rung 2: syntax


def test_bytes_that_are_not_utf8_are_a_parse_error() -> None:
    r = rejected(b'{"jsonrpc": "2.0", "method": "\xff"}')
    assert (r.status, r.code, r.id) == (400, PARSE_ERROR, None)
    assert "UTF-8" in r.message and "offset 30" in r.message


def test_malformed_json_is_a_parse_error_naming_the_position() -> None:
    r = rejected(b'{"jsonrpc": "2.0",\n "id": 1 "method": "ping"}')
    assert (r.status, r.code, r.id) == (400, PARSE_ERROR, None)
    assert "line 2 column 10" in r.message


@pytest.mark.parametrize("raw", [b"NaN", b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"a": Infinity}}'])
def test_non_standard_json_constants_are_a_parse_error(raw: bytes) -> None:
    assert rejected(raw).code == PARSE_ERROR


def test_repeated_keys_are_refused_so_nobody_reads_a_different_tool() -> None:
    raw = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "safe", "name": "rm"}}'
    r = rejected(raw)
    assert (r.status, r.code) == (400, INVALID_REQUEST)
    assert "'name'" in r.message


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000, b"1" * 5000])
def test_pathological_json_is_refused_without_raising(raw: bytes) -> None:
    assert rejected(raw).code == PARSE_ERROR


# Rung 3: shape


def test_an_empty_batch_is_an_invalid_request() -> None:
    r = rejected(b"[]")
    assert (r.status, r.code) == (400, INVALID_REQUEST)
    assert "empty batch" in r.message


@pytest.mark.parametrize(("raw", "kind"), [(b"42", "number"), (b'"ping"', "string"), (b"null", "null")])
def test_a_top_level_scalar_is_an_invalid_request(raw: bytes, kind: str) -> None:
    r = rejected(raw)
    assert (r.status, r.code) == (400, INVALID_REQUEST)
    assert f"not a JSON {kind}" in r.message


# Rung 4: batches


@pytest.mark.parametrize("version", [None, "2024-11-05", "2025-03-26"])
def test_batches_are_accepted_in_the_revisions_that_have_them(version: str | None) -> None:
    headers = {} if version is None else {"mcp-protocol-version": version}
    parsed = accepted(body([request("ping", id=1), call("echo", id=2)]), headers)
    assert parsed.is_batch and parsed.era is Era.LEGACY
    assert [m.id for m in parsed.messages] == [1, 2]
    assert parsed.protocol_version == version


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25", MODERN, "1999-01-01"])
def test_batches_are_refused_in_later_revisions_naming_the_revision(version: str) -> None:
    r = rejected(body([request("ping")]), {"mcp-protocol-version": version})
    assert (r.status, r.code, r.id) == (400, INVALID_REQUEST, None)
    assert repr(version) in r.message and "2025-03-26" in r.message


def test_a_batch_holding_a_modern_message_is_refused() -> None:
    r = rejected(body([request("ping", id=1), modern("tools/list", id=2)]))
    assert (r.status, r.code) == (400, INVALID_REQUEST)
    assert "batch element 1" in r.message and MODERN in r.message


# Rung 5: envelope


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"jsonrpc": "1.0", "id": 7, "method": "ping"}, '"jsonrpc": "2.0"'),
        ({"id": 7, "method": "ping"}, '"jsonrpc": "2.0"'),
        ({"jsonrpc": "2.0", "id": 7, "method": 3}, '"method" must be a string'),
        ({"jsonrpc": "2.0", "id": 7, "method": "x", "params": [1]}, '"params" must be an object'),
        ({"jsonrpc": "2.0", "id": 7}, 'needs "method"'),
        ({"jsonrpc": "2.0", "id": 7, "result": {}, "error": {}}, "exactly one"),
        ({"jsonrpc": "2.0", "id": 7, "error": "bad"}, '"error" must be an object'),
    ],
)
def test_a_malformed_message_is_refused_with_its_id(obj: dict[str, Any], fragment: str) -> None:
    r = rejected(body(obj))
    assert (r.status, r.code, r.id) == (400, INVALID_REQUEST, 7)
    assert fragment in r.message


@pytest.mark.parametrize("bad_id", [True, 1.5, None, {"a": 1}, [1]])
def test_a_request_id_must_be_a_string_or_an_integer(bad_id: Any) -> None:
    r = rejected(body(request("ping", id=bad_id)))
    assert (r.status, r.code, r.id) == (400, INVALID_REQUEST, None)
    assert '"id" must be a string or an integer' in r.message


def test_a_bad_batch_element_is_named_by_its_index() -> None:
    r = rejected(body([request("ping", id="a"), {"jsonrpc": "2.0", "id": "b", "method": None}]))
    assert r.id == "b" and "batch element 1" in r.message


def test_responses_from_the_client_are_valid_messages() -> None:
    parsed = accepted(
        body(
            [
                {"jsonrpc": "2.0", "id": "s-1", "result": {}},
                {"jsonrpc": "2.0", "id": None, "error": {"code": -1, "message": "no"}},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
            ]
        )
    )
    assert [m.kind for m in parsed.messages] == ["response", "response", "notification"]
    assert [m.id for m in parsed.messages] == ["s-1", None, None]
    assert parsed.method is None


def test_a_successful_response_needs_an_id() -> None:
    assert rejected(body({"jsonrpc": "2.0", "id": None, "result": {}})).code == INVALID_REQUEST


# Rung 6: tools/call


@pytest.mark.parametrize("params", [None, {}, {"name": ""}, {"name": 5}, {"arguments": {}}])
def test_tools_call_without_a_tool_name_is_invalid_params(params: dict[str, Any] | None) -> None:
    r = rejected(body(request("tools/call", params, id="c1")))
    assert (r.status, r.code, r.id) == (400, INVALID_PARAMS, "c1")
    assert r.message.startswith("tools/call needs params.name")


def test_tools_call_arguments_must_be_an_object() -> None:
    r = rejected(body(request("tools/call", {"name": "echo", "arguments": ["hi"]}, id=4)))
    assert (r.code, r.id) == (INVALID_PARAMS, 4)
    assert "params.arguments" in r.message


def test_one_nameless_tools_call_refuses_the_whole_batch() -> None:
    r = rejected(body([call("echo", id=1), request("tools/call", {}, id=2)]))
    assert (r.code, r.id) == (INVALID_PARAMS, 2)


# Rung 7: headers and era


def test_a_legacy_request_without_routing_headers_is_accepted() -> None:
    parsed = accepted(body(call("echo", {"text": "hi"}, id=3)), {"mcp-protocol-version": LEGACY})
    assert (parsed.era, parsed.protocol_version, parsed.is_batch) == (Era.LEGACY, LEGACY, False)
    assert (parsed.method, parsed.tool_name) == ("tools/call", "echo")
    assert parsed.messages[0].arguments == {"text": "hi"}


def test_a_modern_request_with_mirroring_headers_is_accepted() -> None:
    parsed = accepted(body(modern("tools/call", {"name": "echo"}, id=3)), modern_headers("tools/call", "echo"))
    assert (parsed.era, parsed.protocol_version, parsed.tool_name) == (Era.MODERN, MODERN, "echo")


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("tools/call", {"name": "grüße 👋"}, "grüße 👋"),
        ("prompts/get", {"name": " padded "}, " padded "),
        ("resources/read", {"uri": "file:///tmp/ä b.txt"}, "file:///tmp/ä b.txt"),
    ],
)
def test_a_base64_mcp_name_is_decoded_before_comparing(method: str, params: dict[str, Any], name: str) -> None:
    headers = modern_headers(method, name)
    assert headers["mcp-name"].startswith("=?base64?")
    assert accepted(body(modern(method, params)), headers).era is Era.MODERN


def mismatch(raw: bytes, headers: dict[str, str]) -> Rejection:
    r = rejected(raw, headers)
    assert (r.status, r.code) == (400, HEADER_MISMATCH)
    return r


def test_modern_without_the_version_header_is_a_header_mismatch() -> None:
    headers = modern_headers("tools/list")
    del headers["mcp-protocol-version"]
    r = mismatch(body(modern("tools/list", id=9)), headers)
    assert r.id == 9 and "MCP-Protocol-Version header is missing" in r.message and MODERN in r.message


def test_a_version_header_that_disagrees_with_meta_is_a_header_mismatch() -> None:
    headers = {**modern_headers("tools/list"), "mcp-protocol-version": LEGACY}
    r = mismatch(body(modern("tools/list")), headers)
    assert LEGACY in r.message and MODERN in r.message


def test_a_modern_version_header_on_a_body_without_meta_is_invalid_params() -> None:
    # 2026-07-28 "Per-request protocol fields": a request without them is -32602, not -32020.
    r = rejected(body(request("tools/list")), modern_headers("tools/list"))
    assert (r.status, r.code) == (400, INVALID_PARAMS) and "has no params._meta" in r.message


@pytest.mark.parametrize("sent", [None, "tools/list"])
def test_mcp_method_must_mirror_the_body(sent: str | None) -> None:
    headers = modern_headers("tools/call", "echo")
    if sent is None:
        del headers["mcp-method"]
    else:
        headers["mcp-method"] = sent
    r = mismatch(body(modern("tools/call", {"name": "echo"})), headers)
    assert "Mcp-Method" in r.message and "'tools/call'" in r.message


@pytest.mark.parametrize("sent", [None, "echo", "=?base64?not base64?=", "=?base64?cm0=?="])
def test_mcp_name_must_mirror_the_body(sent: str | None) -> None:
    headers = modern_headers("tools/call")
    if sent is not None:
        headers["mcp-name"] = sent
    r = mismatch(body(modern("tools/call", {"name": "delete_all"}, id="x")), headers)
    assert r.id == "x" and "Mcp-Name" in r.message and "'delete_all'" in r.message


def test_a_legacy_request_with_a_lying_routing_header_is_a_header_mismatch() -> None:
    mismatch(body(call("delete_all")), {"mcp-method": "tools/list"})
    mismatch(body(call("delete_all")), {"mcp-method": "tools/call", "mcp-name": "echo"})


def test_modern_notifications_must_mirror_the_method_too() -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    parsed = accepted(body(note), modern_headers("notifications/cancelled"))
    assert parsed.era is Era.MODERN and parsed.messages[0].kind == "notification"
    r = mismatch(body(note), modern_headers("notifications/progress"))
    assert r.id is None


def test_an_unknown_meta_version_still_reads_as_modern() -> None:
    obj = modern("tools/list")
    obj["params"]["_meta"][PROTOCOL_VERSION_META_KEY] = "2099-01-01"
    mismatch(body(obj), modern_headers("tools/list"))
    headers = {**modern_headers("tools/list"), "mcp-protocol-version": "2099-01-01"}
    assert accepted(body(obj), headers).era is Era.MODERN


# Messages, encoding, errors


def test_encode_writes_compact_json_from_the_raw_messages() -> None:
    raw = b'{ "jsonrpc" : "2.0", "id": 1, "method": "tools/call", "params": {"name": "\xc3\xa9", "x": 1.0}}'
    assert (
        accepted(raw).encode()
        == '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"é","x":1.0}}'.encode()
    )


def test_keep_filters_a_batch_in_body_order() -> None:
    parsed = accepted(body([request("ping", id=i) for i in range(4)]))
    kept = parsed.keep([3, 0])
    assert kept.is_batch and [m.id for m in kept.messages] == [0, 3]
    assert json.loads(kept.encode()) == [request("ping", id=0), request("ping", id=3)]
    with pytest.raises(IndexError, match="index 4"):
        parsed.keep([4])


def test_a_single_request_emptied_by_keep_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="nothing to encode"):
        accepted(body(request("ping"))).keep([]).encode()


def test_a_lone_surrogate_survives_encoding_as_an_escape() -> None:
    parsed = accepted(b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"s":"\\ud800"}}')
    assert b"\\ud800" in parsed.encode()


def test_error_bodies() -> None:
    assert error_object(1, METHOD_NOT_FOUND, "no") == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": METHOD_NOT_FOUND, "message": "no"},
    }
    assert json.loads(encode_error("a", -32001, "denied", {"tool": "rm"}))["error"]["data"] == {"tool": "rm"}
    assert (
        encode_error(None, PARSE_ERROR, "bad") == b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad"}}'
    )


def test_parse_message_classifies_upstream_responses() -> None:
    message = parse_message({"jsonrpc": "2.0", "id": 2, "result": {"tools": []}})
    assert message is not None and (message.kind, message.id, message.method) == ("response", 2, None)
    assert parse_message([]) is None
    assert parse_message({"jsonrpc": "2.0", "id": 2}) is None
    non_call = parse_message(request("prompts/get", {"name": "p", "arguments": {}}))
    assert non_call is not None and (non_call.tool_name, non_call.arguments) == (None, None)


# Headers


def test_header_sets() -> None:
    assert {"mcp-method", "mcp-name", "mcp-protocol-version"} == ROUTING_HEADERS
    assert {"x-mcp-method", "x-mcp-tool", "x-mcp-server"} == DERIVED_HEADERS


@pytest.mark.parametrize(
    ("version", "era"), [(MODERN, Era.MODERN), (LEGACY, Era.LEGACY), ("2025-03-26", Era.LEGACY), ("x", None)]
)
def test_header_hints_read_the_era_from_the_version_header(version: str, era: Era | None) -> None:
    assert header_hints({"mcp-protocol-version": version}).era is era


def test_header_hints_decode_method_and_name() -> None:
    hints = header_hints(modern_headers("tools/call", "wetter ☀"))
    assert (hints.protocol_version, hints.method, hints.name) == (MODERN, "tools/call", "wetter ☀")
    assert header_hints({}) == type(hints)(None, None, None, None)


def test_find_duplicated_routing_header_ignores_case_and_other_headers() -> None:
    lines = [("Accept", "a"), ("accept", "b"), ("Mcp-Name", "a"), ("mcp-method", "x")]
    assert find_duplicated_routing_header(lines) is None
    assert find_duplicated_routing_header([*lines, ("MCP-NAME", "b")]) == "mcp-name"


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        (None, None),
        ("echo", "echo"),
        ("=?base64?ZWNobw==?=", "echo"),
        ("=?base64?ZWNobw?=", None),  # missing padding
        ("=?base64?ZWNoba==?=", None),  # non-canonical trailing bits
        ("=?base64?/w==?=", None),  # not UTF-8
        ("=?base64?é?=", None),
    ],
)
def test_decode_header_value(value: str | None, decoded: str | None) -> None:
    assert decode_header_value(value) == decoded


# Properties

headers_st = st.dictionaries(
    st.sampled_from(["mcp-protocol-version", "mcp-method", "mcp-name"]),
    st.sampled_from([MODERN, LEGACY, "2025-03-26", "tools/call", "=?base64?ZWNobw==?=", "=?base64?!?=", ""]),
)
json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=300), headers_st)
def test_parse_request_never_raises_on_bytes(raw: bytes, headers: dict[str, str]) -> None:
    assert isinstance(parse_request(raw, headers), McpRequest | Rejection)


@given(json_st, headers_st)
def test_parse_request_never_raises_on_json(value: Any, headers: dict[str, str]) -> None:
    result = parse_request(body(value), headers)
    if isinstance(result, Rejection):
        assert 400 <= result.status < 500 and result.message
    else:
        assert json.loads(result.encode()) == value


ids_st = st.one_of(st.integers(), st.text(max_size=10))
requests_st = st.builds(
    lambda method, id, params: request(method, params, id),
    st.sampled_from(["ping", "tools/list", "resources/list", "completion/complete"]),
    ids_st,
    st.none() | st.dictionaries(st.text(max_size=8), json_st, max_size=4),
)
# Tool names free of control characters and lone surrogates (the rest are refused: test_tool_names.py).
tool_names_st = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)
calls_st = st.builds(
    lambda name, id, args: call(name, args, id),
    tool_names_st.map(lambda name: name[:20]),
    ids_st,
    st.dictionaries(st.text(max_size=8), json_st, max_size=4),
)


@given(st.lists(requests_st | calls_st, min_size=1, max_size=6), st.booleans())
def test_requests_round_trip_through_parse_and_encode(objs: list[dict[str, Any]], as_batch: bool) -> None:
    value: Any = objs if as_batch else objs[0]
    parsed = accepted(body(value))
    assert json.loads(parsed.encode()) == value
    assert [m.id for m in parsed.messages] == [o["id"] for o in (objs if as_batch else objs[:1])]
    assert parsed.method == objs[0]["method"]
    assert parsed.tool_name == (objs[0]["params"]["name"] if objs[0]["method"] == "tools/call" else None)


@given(st.integers(min_value=1, max_value=8).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_keep_preserves_body_order(case: tuple[int, set[int]]) -> None:
    n, wanted = case
    parsed = accepted(body([request("ping", id=i) for i in range(n)]))
    assert [m.id for m in parsed.keep(sorted(wanted, reverse=True)).messages] == sorted(wanted)


@given(tool_names_st)
def test_any_tool_name_the_sdk_encodes_is_accepted_and_another_is_not(name: str) -> None:
    raw = body(modern("tools/call", {"name": name}))
    assert decode_header_value(encode_header_value(name)) == name
    assert accepted(raw, modern_headers("tools/call", name)).tool_name == name
    mismatch(raw, modern_headers("tools/call", name + "x"))


@given(st.text(max_size=30), st.text(st.characters(max_codepoint=127), max_size=30))
def test_decode_header_value_agrees_with_the_sdk(value: str, payload: str) -> None:
    assert decode_header_value(value) == sdk_decode_header_value(value)
    sentinel = f"=?base64?{payload}?="  # ASCII only: the SDK raises on a non-ASCII payload, we say None
    assert decode_header_value(sentinel) == sdk_decode_header_value(sentinel)


def test_error_messages_quote_client_values_briefly() -> None:
    r = rejected(body(modern("tools/call", {"name": "n" * 10_000})), modern_headers("tools/call", "m" * 10_000))
    assert r.code == HEADER_MISMATCH and len(r.message) < 400
