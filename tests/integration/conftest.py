"""Integration fixtures: real upstreams, and `mcp-extproc up` (real Envoy + our server) in front of them.

One gateway per test module serves every upstream:

    /py/mcp         → tests.upstreams.pyserver, legacy era, SSE responses
    /pyjson/mcp     → tests.upstreams.pyserver, legacy era, JSON responses
    /modern/mcp     → tests.upstreams.pyserver, serving 2026-07-28 requests
    /everything/mcp → @modelcontextprotocol/server-everything (TypeScript, streamableHttp)

Every upstream records what it receives, so tests can assert what got through.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.procs import Proc, free_port, start_everything, start_pyserver
from tests.upstreams.pyserver import Record, read_records

GATEWAY_FLAGS: list[str] = []
PY_TOOLS = {"allowedTools": ["echo", "add", "slow_*"], "deniedTools": ["delete_*"]}
EVERYTHING_TOOLS = {"allowedTools": ["echo", "get-*", "trigger-*"], "deniedTools": ["get-env"]}


@dataclass
class Gateway:
    """A running `mcp-extproc up` and the upstreams behind it."""

    base: str
    proc: Proc
    metrics_url: str
    records: dict[str, Path] = field(default_factory=dict)

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def received(self, server: str) -> list[Record]:
        return read_records(self.records[server])


def resource_doc(name: str, port: int, tools: dict[str, list[str]]) -> dict[str, object]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": f"http://127.0.0.1:{port}/mcp", **tools},
    }


def start_gateway(
    resources: Path, log_dir: Path, *extra: str, python: str = sys.executable, env: Mapping[str, str] | None = None
) -> tuple[Proc, str, str]:
    """Start `mcp-extproc up` (with ``python``, in ``env``) on a free port; wait for its ready line.

    Its state directory (session keys, tool pins) is ``log_dir/state`` unless ``env`` names
    one: tests never write to the real home directory.
    """
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(log_dir / "state")} if env is None else env
    argv = [
        python,
        "-m",
        "extproc",
        "up",
        "-f",
        str(resources),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics",
        "127.0.0.1:0",
        *extra,
    ]
    proc = Proc(argv, name="mcp-extproc-up", log_dir=log_dir, env=env)
    try:
        metrics = proc.wait_for_line(r"metrics at (http://\S+)", 30).group(1)
        proc.wait_for_line(r"ready: MCP server", 30)
    except BaseException:
        proc.stop()
        raise
    return proc, f"http://127.0.0.1:{port}", metrics


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    procs: list[Proc] = []
    try:
        records: dict[str, Path] = {}
        docs: list[dict[str, object]] = []
        for name, mode in (("py", "legacy-sse"), ("pyjson", "legacy-json"), ("modern", "modern")):
            records[name] = tmp / f"{name}.jsonl"
            proc, port = start_pyserver(mode, records[name])  # type: ignore[arg-type]
            procs.append(proc)
            docs.append(resource_doc(name, port, PY_TOOLS))
        everything, port = start_everything(log_dir=tmp)
        procs.append(everything)
        docs.append(resource_doc("everything", port, EVERYTHING_TOOLS))
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, base, metrics = start_gateway(resources, tmp, *GATEWAY_FLAGS)
        procs.append(up)
        yield Gateway(base=base, proc=up, metrics_url=metrics, records=records)
    finally:
        for proc in reversed(procs):
            proc.stop()


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus metric (0 when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:  # noqa: S310 - loopback
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") and not labels:  # a sample without labels (a plain gauge)
            return float(line.rsplit(" ", 1)[1])
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
