"""The tools/list filter fails closed: an upstream answer it cannot read is refused, never passed on.

``allowlist`` (behind ``mcp``) on the unit tests' server hides ``add_secret`` (denied) and
``rm`` (not allowed). Each test plays a crafted upstream answer through
:class:`~extproc.testing.StageHarness` and asserts what the agent receives: the answer
filtered, or refused (502 and -32603 for JSON; error events in place of an SSE event,
since the stream's headers are gone). The last test is a property over random answers,
chunkings and malformations.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any, Final

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config.pipeline_file import StageSpec
from extproc.core.registry import Registry
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.mcp.sse import SseDecoder
from extproc.testing import ExchangeResult, Reply, StageHarness
from tests.messages import SERVER_DOC

HIDDEN: Final = b"add_secret"
TOOLS: Final = [{"name": "echo"}, {"name": "add_secret"}, {"name": "rm"}, {"name": "add"}]
SSE: Final = {"content-type": "text/event-stream"}
LIST: Final = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
UNREADABLE: Final = "the gateway could not read the upstream's answer"


def gate() -> StageHarness:
    return StageHarness(Registry().build(StageSpec(name="allowlist")), stages_before=["mcp"], resources=[SERVER_DOC])


def listed(id_: Any = 1, tools: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": {"tools": TOOLS if tools is None else tools}}


def event(data: bytes | str, end: bytes = b"\n\n") -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return b"event: message\ndata: " + raw + end


async def list_then(
    *, body: bytes | None = None, chunks: list[bytes] | None = None, headers: dict[str, str] | None = None
) -> Reply:
    result = await gate().post(LIST)
    assert result.response_phases and result.wants_response_body
    return await result.respond(headers=headers, body=body, chunks=chunks)


def refused(reply: Reply, id_: Any = 1) -> dict[str, Any]:
    assert reply.status == 502, reply
    error: dict[str, Any] = reply.json()
    assert error["id"] == id_ and error["error"]["code"] == INTERNAL_ERROR
    assert error["error"]["message"].startswith(UNREADABLE)
    assert HIDDEN not in reply.body
    return error


def events_of(body: bytes) -> list[Any]:
    """The messages a client dispatches from ``body`` (the tail read too, as a lenient client might)."""
    return [json.loads(e.data) for e in SseDecoder().feed(body + b"\n\n") if e.data]


def names(message: Any) -> list[str]:
    return [tool["name"] for tool in message["result"]["tools"]]


# -- JSON -------------------------------------------------------------------------------------


async def test_an_integer_past_pythons_digit_limit_is_refused() -> None:
    body = json.dumps(listed()).encode()[:-1] + b',"n":' + b"9" * 5000 + b"}"
    error = refused(await list_then(body=body))
    assert "integer too long" in error["error"]["message"]


async def test_invalid_utf8_in_a_json_body_is_refused() -> None:
    body = json.dumps(listed(tools=[*TOOLS, {"name": "x", "description": "caf"}])).encode()
    refused(await list_then(body=body.replace(b"caf", b"caf\xe9")))


async def test_repeated_keys_a_byte_order_mark_and_a_foreign_charset_are_refused() -> None:
    clean = json.dumps(listed(tools=[{"name": "echo"}])).encode()
    twice = clean[:-1] + b',"result":' + json.dumps({"tools": TOOLS}).encode() + b"}"
    refused(await list_then(body=twice))
    refused(await list_then(body=b"\xef\xbb\xbf" + json.dumps(listed()).encode()))
    utf16 = json.dumps(listed()).encode("utf-16")
    refused(await list_then(body=utf16, headers={"content-type": "application/json; charset=utf-16"}))


async def test_a_result_whose_id_differs_in_type_is_filtered_all_the_same() -> None:
    # The TypeScript SDK looks up Number(id): "1" answers request 1.
    reply = await list_then(body=json.dumps(listed("1")).encode())
    assert reply.status == 200 and names(reply.json()) == ["echo", "add"]


async def test_a_result_for_an_id_nobody_asked_is_filtered() -> None:
    reply = await list_then(body=json.dumps([listed(1, []), listed(99)]).encode())
    assert [names(m) for m in reply.json()] == [[], ["echo", "add"]]


async def test_tools_that_is_not_a_list_is_refused() -> None:
    refused(await list_then(body=json.dumps(listed(tools={"0": {"name": "add_secret"}})).encode()))


async def test_an_empty_answer_has_nothing_to_read() -> None:
    result = await gate().post(LIST)
    assert (await result.respond(202)).body == b""


async def test_a_batch_refused_whole_answers_every_request_and_keeps_the_held_errors() -> None:
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "rm", "arguments": {}}}
    ping = {"jsonrpc": "2.0", "id": "p", "method": "ping"}
    result = await gate().post([LIST, call, ping])
    reply = await result.respond(body=b'[{"jsonrpc":"2.0","id":1,"result":{"tools":[' + b"1" * 5000 + b"]}}]")
    assert reply.status == 502
    errors = {e["id"]: e["error"]["code"] for e in reply.json()}
    assert errors == {1: INTERNAL_ERROR, "p": INTERNAL_ERROR, 2: -32003}


# -- SSE --------------------------------------------------------------------------------------


async def test_a_json_batch_inside_an_sse_event_is_filtered() -> None:
    reply = await list_then(chunks=[event(json.dumps([listed(), listed(7)]))], headers=SSE)
    [batch] = events_of(reply.body)
    assert [names(m) for m in batch] == [["echo", "add"], ["echo", "add"]]


async def test_a_final_event_without_its_blank_line_is_filtered_and_completed() -> None:
    for end in (b"", b"\n", b"\r", b"\n\r"):
        reply = await list_then(chunks=[b": hi\n\n", event(json.dumps(listed()), end)], headers=SSE)
        assert HIDDEN not in reply.body, end
        assert reply.body.endswith(b"\n\n") and [names(m) for m in events_of(reply.body)] == [["echo", "add"]]


async def test_an_unreadable_event_becomes_an_error_for_the_pending_request() -> None:
    progress = event('{"jsonrpc":"2.0","method":"notifications/progress","params":{}}')
    bad = event(json.dumps(listed())[:-1] + ',"n":' + "9" * 5000 + "}")
    reply = await list_then(chunks=[progress, bad[:30], bad[30:], b": bye\n\n"], headers=SSE)
    assert reply.status == 200 and HIDDEN not in reply.body
    assert reply.chunks[0] == progress  # what was readable passed at once, untouched
    [note, error] = events_of(reply.body)
    assert note["method"] == "notifications/progress"
    assert error["id"] == 1 and error["error"]["code"] == INTERNAL_ERROR
    assert error["error"]["message"].startswith(UNREADABLE)


async def test_an_unreadable_event_after_the_answer_is_dropped() -> None:
    lossy = event(b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add_secret","x":"\xff"}]}}')
    reply = await list_then(chunks=[event(json.dumps(listed())), lossy], headers=SSE)
    assert HIDDEN not in reply.body and b"dropped an event" in reply.body
    assert [names(m) for m in events_of(reply.body)] == [["echo", "add"]]


async def test_a_stream_in_a_foreign_charset_is_refused_and_the_rest_dropped() -> None:
    chunks = [event(json.dumps(listed())).decode().encode("utf-16"), b"data: more\n\n"]
    reply = await list_then(chunks=chunks, headers={"content-type": "text/event-stream; charset=UTF-16"})
    [error] = events_of(reply.body)
    assert error["id"] == 1 and "charset 'utf-16'" in error["error"]["message"]
    assert reply.chunks[1] == b""


async def test_an_event_past_the_size_limit_spends_the_stream() -> None:
    huge = b"data: " + b"x" * (4 * 1024 * 1024 + 1)
    reply = await list_then(chunks=[huge, event(json.dumps(listed()))], headers=SSE)
    [error] = events_of(reply.body)
    assert error["error"]["code"] == INTERNAL_ERROR and reply.chunks[1] == b""


# -- GET: standalone streams and resumptions ----------------------------------------------------


async def get(headers: dict[str, str] | None = None) -> ExchangeResult:
    result = await gate().get(headers={"last-event-id": "stream-1_3", **(headers or {})})
    assert result.response_phases and result.wants_response_body
    return result


async def test_a_replayed_tools_list_result_on_a_resumed_get_is_filtered() -> None:
    replay = b"id: stream-1_4\n" + event(json.dumps(listed()))
    reply = await (await get()).respond(headers=SSE, chunks=[b"id: stream-1_3\ndata: \n\n", replay])
    assert HIDDEN not in reply.body and b"id: stream-1_4" in reply.body
    assert [names(m) for m in events_of(reply.body)] == [["echo", "add"]]


async def test_a_get_answered_as_json_is_read_as_the_events_clients_see() -> None:
    body = event(json.dumps(listed()))  # events, whatever the content-type: the TypeScript SDK reads them
    reply = await (await get()).respond(headers={"content-type": "application/json"}, chunks=[body])
    assert HIDDEN not in reply.body


async def test_an_unreadable_event_on_a_get_is_dropped_and_a_failed_get_passes() -> None:
    bad = event(b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add_secret"}],"n":' + b"1" * 5000 + b"}}")
    reply = await (await get()).respond(headers=SSE, chunks=[bad])
    assert HIDDEN not in reply.body and b"dropped an event" in reply.body
    failed = await (await get()).respond(405, headers={"content-type": "text/plain"}, body=b"Method Not Allowed")
    assert failed.status == 405 and failed.body == b"Method Not Allowed"


async def test_a_server_that_hides_nothing_reads_no_get() -> None:
    open_server = {**SERVER_DOC, "spec": {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"]}}
    harness = StageHarness(
        Registry().build(StageSpec(name="allowlist")), stages_before=["mcp"], resources=[open_server]
    )
    assert not (await harness.get()).response_phases


# -- the property: filtered or refused, never delivered with the hidden tool ---------------------

IDS: Final = st.sampled_from([1, "1", 99, None, 1.0])
MALFORMATIONS: Final = st.sampled_from(["none", "bigint", "utf8", "twice", "bom", "notlist", "charset", "nan"])


def upstream_message(id_: Any, malformation: str) -> bytes:
    message: dict[str, Any] = listed(id_)
    if id_ is None:
        del message["id"]
    if malformation == "notlist":
        message["result"]["tools"] = {"0": {"name": "add_secret"}}
    raw = json.dumps(message).encode()
    if malformation == "bigint":
        raw = raw[:-1] + b',"n":' + b"7" * 4400 + b"}"
    elif malformation == "utf8":
        raw = raw.replace(b'"echo"', b'"ech\xf6"')
    elif malformation == "twice":
        raw = raw[:-1] + b',"result":{"tools":[]}}'
    elif malformation == "nan":
        raw = raw[:-1] + b',"n":NaN}'
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.tuples(IDS, MALFORMATIONS), min_size=1, max_size=3),
    as_sse=st.booleans(),
    batch_in_event=st.booleans(),
    ending=st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n", b"", b"\r", b"\n\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
    bom=st.booleans(),
)
async def test_any_upstream_answer_is_filtered_or_refused(
    messages: list[tuple[Any, str]],
    as_sse: bool,
    batch_in_event: bool,
    ending: bytes,
    cuts: list[int],
    bom: bool,
) -> None:
    raws = [upstream_message(id_, malformation) for id_, malformation in messages]
    charset = any(m == "charset" for _, m in messages)
    headers = {
        "content-type": ("text/event-stream" if as_sse else "application/json") + ("; charset=latin-1" * charset)
    }
    if as_sse:
        datas = [b"[" + b",".join(raws) + b"]"] if batch_in_event else raws
        stream = b"".join(event(d) for d in datas[:-1]) + event(datas[-1], ending)
        stream = b"\xef\xbb\xbf" + stream if bom else stream
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        chunks = [stream[a:b] for a, b in pairwise(points)] or [b""]
        reply = await list_then(chunks=chunks, headers=headers)
        assert reply.status == 200
    else:
        body = raws[0] if len(raws) == 1 else b"[" + b",".join(raws) + b"]"
        reply = await list_then(body=b"\xef\xbb\xbf" + body if bom else body, headers=headers)
        if reply.status == 502:
            assert reply.json()["error"]["message"].startswith(UNREADABLE)
        else:
            assert reply.status == 200
            for message in reply.json() if isinstance(reply.json(), list) else [reply.json()]:
                assert names(message) == ["echo", "add"]
    assert HIDDEN not in reply.body
