"""The README's worked example stage, chained after the built-ins, behaves as documented."""

from __future__ import annotations

import json

from examples.stage_example import ArgumentLimit
from extproc.config.pipeline_file import PipelineConfig, StageSpec
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.frontdoor.ext_proc import Processor
from tests.unit.conftest import body_msg, headers_msg, post_headers


async def test_example_stage_refuses_large_arguments(catalog: Catalog) -> None:
    registry = Registry()
    registry.register(ArgumentLimit)
    config = PipelineConfig(
        stages=[
            StageSpec(name="mcp"),
            StageSpec(name="allowlist"),
            StageSpec(name="argument-limit", config={"maxArgumentBytes": 32}),
        ]
    )
    pipeline = registry.build_pipeline(config)

    async def send(text: str) -> str | None:
        proc = Processor(pipeline, catalog)
        await proc.handle(headers_msg(post_headers()))
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"t": text}}}
        reply = await proc.handle(body_msg(call))
        if reply.WhichOneof("response") != "immediate_response":
            return None
        message: str = json.loads(reply.immediate_response.body)["error"]["message"]
        return message

    assert await send("short") is None
    assert await send("x" * 100) == "arguments of 'echo' are 109 bytes; the limit is 32"
