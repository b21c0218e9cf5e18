"""``python -m bench.rego``: per-decision latency of the embedded Rego engine and the policy stage.

In process, no Envoy: the figures are what one decision adds to a ``tools/call``.

    EmbeddedRego.evaluate        compiled bundle, a new input each time
    re-parsed query              what compiling once saves (Interpreter.query each time)
    PolicyStage.refuse_call      rules + Rego, decision cache off / cache hit

Prints one line per measurement: median and p99 in microseconds over N runs.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from regopy import Input, Interpreter

from extproc.api import Context, Principal
from extproc.config.resources import parse_documents
from extproc.mcp.jsonrpc import parse_request
from plugins.lib.rego import EmbeddedRego
from plugins.policy import PolicyConfig, PolicyStage

MODULE = """package mcp
import rego.v1
default allow := true
allow := false if { input.tool == "add"; input.arguments.a > 100 }
"""
RUNS = 2000


def _report(name: str, samples: list[float]) -> None:
    samples.sort()
    p99 = samples[int(len(samples) * 0.99) - 1]
    print(f"{name:<44} median {statistics.median(samples) * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us")


async def _time(name: str, step: Callable[[int], Awaitable[Any]]) -> None:
    for i in range(100):
        await step(i)
    samples = []
    for i in range(RUNS):
        started = time.perf_counter()
        await step(i)
        samples.append(time.perf_counter() - started)
    _report(name, samples)


async def main() -> None:
    engine = EmbeddedRego("p.rego", MODULE, "data.mcp.allow")
    await _time("embedded Rego, compiled once", lambda i: engine.evaluate({"tool": "add", "arguments": {"a": i}}))
    parsed = Interpreter()
    parsed.add_module("p.rego", MODULE)

    async def reparse(i: int) -> Any:
        parsed.set_input(Input({"tool": "add", "arguments": {"a": i}}))
        return parsed.query("data.mcp.allow")

    await _time("embedded Rego, query re-parsed each time", reparse)
    docs = [
        {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "demo"},
         "spec": {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"]}},
        {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "p"},
         "spec": {"targetRefs": [{"name": "demo"}], "rules": [{"tools": ["add"], "requiredTrust": "low"}],
                  "rego": {"query": "data.mcp.allow", "module": MODULE}}},
    ]  # fmt: skip
    catalog = parse_documents(docs, "bench")
    server = catalog.servers["demo"]
    principal = Principal(subject="alice", issuer="https://iss.test", agent="agent", granted="high", consented="high")
    for label, ttl in (("policy stage, decision cache off", 0.0), ("policy stage, decision cache hit", 60.0)):
        stage = PolicyStage(PolicyConfig(decisionCacheSeconds=ttl))

        async def decide(i: int, stage: PolicyStage = stage, vary: bool = ttl == 0.0) -> Any:
            body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":%d}}}'
            request = parse_request(body % (i if vary else 1), {})
            assert not isinstance(request, type(None))
            ctx = Context(request_id="b", http_method="POST", path="/demo/mcp", request_headers={}, catalog=catalog)
            ctx.principal = principal
            message = request.messages[0]  # type: ignore[union-attr]
            return await stage.refuse_call(ctx, server, message)

        await _time(label, decide)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
