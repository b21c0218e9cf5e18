"""The ``forbid-argument-keys`` stage: refuse tool calls whose arguments carry forbidden keys.

Data flow::

    request body (parsed by the ``mcp`` stage into ctx.mcp)
        ─▶ any tools/call whose arguments hold a forbidden key, at any depth
             → Deny: HTTP 200, JSON-RPC error -32003 naming the key; the MCP server
               never sees the call
        ─▶ otherwise, when a tools/call was checked
             → Continue: header ``x-argument-keys-checked: <n>`` (keys inspected) on the
               request to the MCP server

Configuration (pipeline file)::

    - name: forbid-argument-keys
      config: {keys: [password, api_key]}   # compared case-insensitively
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field

from extproc.api import Context, Continue, Deny, Stage, StageConfig, Verdict
from extproc.mcp.codes import POLICY_DENIED

CHECKED_HEADER = "x-argument-keys-checked"


class ForbidArgumentKeysConfig(StageConfig):
    """Configuration of ``forbid-argument-keys``."""

    keys: list[str] = Field(min_length=1, description="argument keys to refuse, at any depth, case-insensitive")


def walk_keys(value: Any) -> Iterator[str]:
    """Every object key inside a JSON value, depth first."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from walk_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_keys(item)


class ForbidArgumentKeys(Stage[ForbidArgumentKeysConfig]):
    """Refuse ``tools/call`` requests whose arguments hold a forbidden key."""

    name: ClassVar[str] = "forbid-argument-keys"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)  # ctx.mcp is parsed by the mcp stage
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()  # decides from the request, rewrites nothing

    async def on_request_body(self, ctx: Context) -> Verdict:
        config = self.config
        forbidden = {key.lower() for key in config.keys}
        checked = 0
        for message in ctx.mcp.messages if ctx.mcp else ():
            if message.tool_name is None:
                continue
            for key in walk_keys(dict(message.arguments or {})):
                checked += 1
                if key.lower() in forbidden:
                    return Deny(
                        code=POLICY_DENIED,
                        reason="forbidden_argument_key",
                        message=f"arguments of {message.tool_name!r} carry the forbidden key {key!r}",
                    )
        if checked == 0:
            return None
        return Continue(set_headers={CHECKED_HEADER: str(checked)})
