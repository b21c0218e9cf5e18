"""The README's worked example stage, chained after the built-ins, behaves as documented."""

from __future__ import annotations

from examples.stage_example import ArgumentLimit, ArgumentLimitConfig
from extproc.config.resources import Catalog
from extproc.testing import StageHarness


async def test_example_stage_refuses_large_arguments(catalog: Catalog) -> None:
    stage = ArgumentLimit(ArgumentLimitConfig.model_validate({"maxArgumentBytes": 32}))
    harness = StageHarness(stage, stages_before=["mcp", "allowlist"], resources=catalog)

    async def send(text: str) -> str | None:
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"t": text}}}
        result = await harness.post(call)
        if result.reply is None:
            return None
        message: str = result.reply.json()["error"]["message"]
        return message

    assert await send("short") is None
    assert await send("x" * 100) == "arguments of 'echo' are 109 bytes; the limit is 32"
