"""A worked example stage: refuse tool calls whose arguments are too large.

Install it like any stage: point an entry point of the ``mcp_extproc.stages``
group at the class (in your package's ``pyproject.toml``)::

    [project.entry-points."mcp_extproc.stages"]
    argument-limit = "my_package.stages:ArgumentLimit"

then name it in a pipeline file and pass ``--pipeline pipeline.yaml``::

    version: v1
    stages:
      - name: mcp
      - name: allowlist
      - name: argument-limit
        config: {maxArgumentBytes: 2048}
        failureMode: closed

Its test (``tests/unit/test_stage_example.py``) runs it after ``mcp`` and ``allowlist``
with :class:`extproc.testing.StageHarness`.
"""

from __future__ import annotations

import json
from typing import ClassVar

from pydantic import Field

from extproc.api import Context, Deny, Stage, StageConfig, Verdict
from extproc.mcp.codes import POLICY_DENIED


class ArgumentLimitConfig(StageConfig):
    """Validated from the pipeline file's ``config`` mapping (unknown keys are errors)."""

    max_argument_bytes: int = Field(default=16 * 1024, gt=0, alias="maxArgumentBytes")


class ArgumentLimit(Stage[ArgumentLimitConfig]):
    """Refuse ``tools/call`` requests whose JSON arguments exceed a size limit."""

    name: ClassVar[str] = "argument-limit"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)  # ctx.mcp is parsed by the mcp stage
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()  # decides from the request, rewrites nothing

    async def on_request_body(self, ctx: Context) -> Verdict:
        config = self.config
        if ctx.mcp is None:
            return None
        for message in ctx.mcp.messages:
            if message.tool_name is None:
                continue
            size = len(json.dumps(message.arguments or {}))
            if size > config.max_argument_bytes:
                return Deny(
                    code=POLICY_DENIED,
                    message=f"arguments of {message.tool_name!r} are {size} bytes; the limit is "
                    f"{config.max_argument_bytes}",
                    reason="arguments_too_large",
                )
        return None
