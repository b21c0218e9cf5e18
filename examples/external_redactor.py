"""An external stage written with :mod:`extproc.external.kit`: redact email addresses.

It runs as its own process and mcp-extproc's ``external`` stage calls it over gRPC:

- request phase, ``tools/call``: email addresses in string arguments are replaced by
  ``[redacted email]`` before the MCP server sees them;
- response phase, ``tools/call``: the same in the text content of the result, before
  the agent sees it.

Run it (``--address 127.0.0.1:0`` picks a free port and prints it)::

    python -m examples.external_redactor --address unix:/tmp/redactor.sock

and name it in a pipeline file::

    - name: external
      config:
        services:
          - address: unix:/tmp/redactor.sock
"""

from __future__ import annotations

import re
import sys
from typing import Any, Final

from extproc.external.kit import Forward, Request, main, stage

EMAIL: Final = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
MASK: Final = "[redacted email]"


def redact(value: Any) -> tuple[Any, int]:
    """``value`` with every email address in its strings masked, and how many were masked."""
    if isinstance(value, str):
        return EMAIL.subn(MASK, value)
    if isinstance(value, dict):
        count, out = 0, {}
        for key, item in value.items():
            out[key], n = redact(item)
            count += n
        return out, count
    if isinstance(value, list):
        count, items = 0, []
        for item in value:
            new, n = redact(item)
            items.append(new)
            count += n
        return items, count
    return value, 0


@stage("email-redactor", phases=["request", "response"], methods=["tools/call"])
async def email_redactor(request: Request) -> Forward | None:
    """Mask email addresses in tool-call arguments and in tool results."""
    if request.phase == "request" and request.params is not None:
        params, count = redact(request.params)
        if count:
            return Forward(params=params, metadata={"redacted": str(count)})
    if request.phase == "response" and request.result is not None:
        result, count = redact(request.result)
        if count:
            return Forward(result=result)
    return None


if __name__ == "__main__":
    sys.exit(main(email_redactor))
