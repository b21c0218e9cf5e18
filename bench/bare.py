"""``python -m bench.bare``: the extension server with no stages at all, the benchmark's baseline.

``mcp-extproc serve`` refuses a pipeline that cannot enforce its resources (no
``allowlist`` while an MCPServer exists: extproc.core.posture). The baseline row
"ext_proc, no stages" measures exactly such a pipeline, what the framework and gRPC
cost before any stage runs, so the benchmark starts that server here, with the same
server object and sockets ``serve`` uses. Nothing but the benchmark runs it.

Data flow::

    -f resources.yaml ─▶ Catalog ─▶ Pipeline([]) ─▶ ExtProcServer on --unix (+ --authz-http)
    SIGTERM / SIGINT  ─▶ stop(grace)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from extproc.config.resources import load_resources
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.frontdoor.servers import ExtProcServer, Listen


async def _serve(resources: Path, unix: str, authz_http: str) -> None:
    server = ExtProcServer(
        Pipeline([], Metrics()), load_resources(resources), Listen(tcp=None, unix=unix, authz_http=authz_http)
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--file", type=Path, required=True)
    parser.add_argument("--unix", required=True)
    parser.add_argument("--authz-http", required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.file, args.unix, args.authz_http))


if __name__ == "__main__":
    main()
