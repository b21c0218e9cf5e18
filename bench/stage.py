"""The external stage the benchmark calls: one ``Process`` per ``tools/call``, nothing else.

Written with :mod:`extproc.external.kit`, like an author's stage. It continues every call
unchanged, except a call whose ``text`` argument is :data:`DENY_TEXT`, which it denies
(the sanity check's proof that the stage is really in the path)::

    python -m bench.stage --address unix:/tmp/bench-stage.sock
"""

from __future__ import annotations

import sys
from typing import Final

from extproc.external.kit import Refuse, Request, main, stage

DENY_TEXT: Final = "deny-me-external"


@stage("bench-external", phases=["request"], methods=["tools/call"])
async def bench_external(request: Request) -> Refuse | None:
    """Refuse :data:`DENY_TEXT`, continue everything else."""
    if (request.arguments or {}).get("text") == DENY_TEXT:
        return Refuse("denied by the benchmark's external stage")
    return None


if __name__ == "__main__":
    sys.exit(main(bench_external))
