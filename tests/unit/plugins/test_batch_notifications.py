"""A refused notification is never answered (JSON-RPC 2.0): it is not forwarded, and no error stands for it.

``allowlist`` (behind ``mcp``) on the unit tests' server refuses ``rm`` and ``add_secret``.
A ``tools/call`` sent as a notification (no ``id``) used to come back as an error with
``"id": null``, in a batch's merged answer or on its own.
"""

from __future__ import annotations

import json
from typing import Any, Final

from extproc.config.pipeline_file import StageSpec
from extproc.core.registry import Registry
from extproc.mcp.codes import POLICY_DENIED
from extproc.testing import StageHarness
from tests.messages import SERVER_DOC

SSE: Final = {"content-type": "text/event-stream"}


def gate() -> StageHarness:
    return StageHarness(Registry().build(StageSpec(name="allowlist")), stages_before=["mcp"], resources=[SERVER_DOC])


def call(tool: str, id_: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": tool, "arguments": {}}}
    return message if id_ is None else {**message, "id": id_}


def ids_in(body: bytes) -> list[Any]:
    decoded = json.loads(body)
    return [m.get("id", "absent") for m in (decoded if isinstance(decoded, list) else [decoded])]


async def test_a_refused_notification_in_a_batch_is_cut_without_an_error() -> None:
    result = await gate().post([call("rm"), call("echo", 1)])
    assert result.body_forwarded is not None and json.loads(result.body_forwarded) == [call("echo", 1)]
    reply = await result.respond(body=b'[{"jsonrpc":"2.0","id":1,"result":{"content":[]}}]')
    assert ids_in(reply.body) == [1]  # the upstream's answer, and no {"id": null} error


async def test_only_refused_requests_get_errors_when_the_batch_is_answered_here() -> None:
    result = await gate().post([call("rm"), call("add_secret", 2), call("rm", "three")])
    assert result.reply is not None and result.reply.status == 200
    assert ids_in(result.reply.body) == [2, "three"]
    assert {e["error"]["code"] for e in json.loads(result.reply.body)} == {POLICY_DENIED}


async def test_a_batch_of_refused_notifications_gets_no_answer() -> None:
    result = await gate().post([call("rm"), call("add_secret")])
    assert result.denied and result.body_forwarded is None  # the upstream sees nothing
    assert result.reply is not None and (result.reply.status, result.reply.body) == (202, b"")


async def test_a_single_refused_notification_gets_no_answer() -> None:
    result = await gate().post(call("rm"))
    assert result.denied and result.body_forwarded is None
    assert result.reply is not None and (result.reply.status, result.reply.body) == (202, b"")


async def test_over_sse_only_refused_requests_get_an_extra_event() -> None:
    result = await gate().post([call("rm"), call("rm", 4), {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}])
    listed = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}]}}
    reply = await result.respond(
        headers=SSE, chunks=[b"event: message\ndata: " + json.dumps(listed).encode() + b"\n\n"]
    )
    events = [json.loads(line[6:]) for line in reply.body.splitlines() if line.startswith(b"data: ")]
    assert [e["id"] for e in events] == [1, 4]
