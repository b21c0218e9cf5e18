"""Tests of the example stage package: the stage itself, and that mcp-extproc finds it by entry point.

Run with ``pytest examples/stage-package/tests`` once the package is installed
(``pip install ./examples/stage-package``); mcp-extproc's own ``make test`` does both.
They use mcp-extproc's stage test harness (:mod:`extproc.testing`): the stage runs after
the real ``mcp`` stage, phase by phase, as Envoy would drive it, with no Envoy.
"""

from __future__ import annotations

from typing import Any

from mcp_stage_example.stage import CHECKED_HEADER, ForbidArgumentKeys, ForbidArgumentKeysConfig

from extproc.config.pipeline_file import StageSpec
from extproc.core.registry import Registry
from extproc.testing import StageHarness


def _call(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "login", "arguments": arguments}}


def _harness(*keys: str) -> StageHarness:
    stage = ForbidArgumentKeys(ForbidArgumentKeysConfig.model_validate({"keys": list(keys)}))
    return StageHarness(stage, stages_before=["mcp"])


async def test_a_forbidden_key_at_any_depth_is_refused() -> None:
    result = await _harness("password").post(_call({"user": {"PassWord": "x"}}))
    assert result.deny is not None
    assert result.deny.code == -32003
    assert result.deny.message == "arguments of 'login' carry the forbidden key 'PassWord'"
    assert result.reply is not None and result.reply.status == 200  # what the agent gets: HTTP 200,
    assert result.reply.json()["id"] == 7  # a JSON-RPC error with the call's id
    assert result.body_forwarded is None  # and the MCP server never sees the call


async def test_clean_arguments_pass_with_the_checked_header() -> None:
    result = await _harness("password").post(_call({"user": "bob", "tags": [{"a": 1}]}))
    assert not result.denied
    assert result.headers_set[CHECKED_HEADER] == "3"
    assert result.upstream_headers[CHECKED_HEADER] == "3"


async def test_mcp_extproc_finds_the_stage_by_entry_point_and_runs_it() -> None:
    stage = Registry().build(StageSpec(name="forbid-argument-keys", config={"keys": ["token"]}))
    result = await StageHarness(stage, stages_before=["mcp"]).post(_call({"token": "t"}))
    assert result.deny is not None
    assert "token" in result.deny.message
