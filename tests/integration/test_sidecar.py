"""The injected sidecars, run as the controller renders them: real Envoy and ``serve``.

    controller.render.namespace (ConfigMap / Secret files) + controller.render.inject (the two containers' args)
        ──▶ mcp-extproc serve  (its container's args: the gRPC and HTTP authorization sockets)
        ──▶ envoy -c envoy.yaml (its container's args)
        ──▶ an SDK agent with a signed JWT ──▶ tests.upstreams.pyserver

Only what a pod has and this machine has not is substituted: the files' directory
(``/etc/mcp-extproc``, the projected volume) and the socket directory (the ``emptyDir``)
become temporary directories, the ports free ones, and the metrics port 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from controller.render.inject import sidecar_containers
from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from controller.render.sidecar import CONFIG_DIR
from extproc.commands.envoy import envoy_binary
from tests.agents import legacy_session, raw_post
from tests.idp import Idp, agent_doc, rsa_key, running_idp
from tests.procs import Proc, admin_get, admin_ready, free_port, start_pyserver, unix_connects, until_ready
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

NS = "agents"
UPSTREAM_TOKEN = "sidecar-upstream-token"


@dataclass
class Pod:
    url: str
    admin: str
    """The sidecar Envoy's admin unix socket."""
    idp: Idp
    records: Path


def _documents(port: int, jwks_uri: str) -> list[dict[str, Any]]:
    agent = agent_doc("assistant", jwks_uri, ["tools"])
    agent["metadata"]["namespace"] = NS
    agent["spec"]["selector"] = {"matchLabels": {"app": "assistant"}}
    server = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": "tools", "namespace": NS},
        "spec": {
            "url": f"http://127.0.0.1:{port}/mcp",
            "allowedTools": ["echo", "add"],
            "upstreamAuth": {"bearer": {"secretRef": {"name": "tools-token", "key": "token"}}},
        },
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "tools-token", "namespace": NS},
        "stringData": {"token": UPSTREAM_TOKEN},
    }
    return [server, secret, agent]


def _files(objects: list[dict[str, Any]], config_dir: Path) -> None:
    """The projected volume: every key of the agent's ConfigMap and Secret as a file."""
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"] == "mcp-agent-assistant":
            for key, value in {**obj.get("data", {}), **obj.get("stringData", {})}.items():
                (config_dir / key).write_text(value)


def _local(args: list[str], config_dir: Path) -> list[str]:
    out = [arg.replace(CONFIG_DIR, str(config_dir)) for arg in args]
    if "--metrics" in out:
        out[out.index("--metrics") + 1] = "127.0.0.1:0"
    return out


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("sidecar")
    config_dir, socket_dir = tmp / "etc", tmp / "run"
    config_dir.mkdir()
    socket_dir.mkdir()
    records = tmp / "tools.jsonl"
    procs: list[Proc] = []
    with running_idp() as idp:
        try:
            upstream, port = start_pyserver("legacy-json", records)
            procs.append(upstream)
            settings = ControllerSettings(sidecar_port=free_port(), socket_dir=str(socket_dir))
            [(view, rendered)] = render_documents(_documents(port, idp.jwks_uri), settings).values()
            assert not rendered.problems, rendered.problems
            _files(rendered.objects, config_dir)
            extproc, envoy = sidecar_containers(view.catalog.agents["assistant"], settings)
            # The pod starts them in this order, each after the one before passed its startup probe.
            argv = [sys.executable, "-m", "extproc", *_local(extproc["args"], config_dir)]
            serve = Proc(argv, name="sidecar-extproc", log_dir=tmp)
            procs.append(serve)
            until_ready(lambda: unix_connects(settings.socket_path), serve, "the extension server's socket")
            front = Proc([envoy_binary(), *_local(envoy["args"], config_dir)], name="sidecar-envoy", log_dir=tmp)
            procs.append(front)
            admin = settings.admin_socket_path
            until_ready(lambda: admin_ready(admin), front, "the sidecar Envoy")
            assert Path(admin).stat().st_mode & 0o777 == 0o600  # the admin API answers its own UID only
            # The startup probe the pod spec carries finds it ready too (over the admin socket).
            probe = envoy["startupProbe"]["exec"]["command"]
            assert subprocess.run([sys.executable, *probe[1:]], check=False, timeout=10).returncode == 0
            yield Pod(f"http://127.0.0.1:{settings.sidecar_port}/tools/mcp", admin, idp, records)
        finally:
            for proc in reversed(procs):
                proc.stop()


def _counter(admin: str, name: str) -> int:
    status, body = admin_get(admin, f"/stats?format=json&filter=^{name}$")
    assert status == 200, body
    stats: list[dict[str, Any]] = json.loads(body)["stats"]
    return sum(int(s.get("value", 0)) for s in stats)


async def test_a_tool_call_through_the_injected_sidecars_is_one_http_check(pod: Pod) -> None:
    token = pod.idp.mint("alice")
    checks = _counter(pod.admin, "http.mcp.ext_authz.ok")
    async with legacy_session(pod.url, headers={"authorization": f"Bearer {token}"}) as session:
        result = await session.call_tool("echo", {"text": "via the sidecar"})
        assert result.content[0].text == "via the sidecar"  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="not allowed"):
            await session.call_tool("rm_everything", {})
    assert _counter(pod.admin, "http.mcp.ext_authz.ok") == checks + 1  # the allowed call: one check
    assert _counter(pod.admin, "cluster.mcp_extproc_authz_http.upstream_rq_completed") >= 2  # over HTTP
    calls = [
        r for r in read_records(pod.records) if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"
    ]
    assert [r["headers"].get("authorization") for r in calls] == [f"Bearer {UPSTREAM_TOKEN}"]  # not the agent's


@pytest.mark.parametrize("token", [None, "forged"])
async def test_a_call_without_a_valid_token_is_refused_on_the_fast_route(pod: Pod, token: str | None) -> None:
    headers = {"mcp-protocol-version": "2025-06-18"}
    if token is not None:
        headers["authorization"] = f"Bearer {pod.idp.mint('mallory', key=rsa_key())}"  # a key the issuer never had
    call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
    before = len(read_records(pod.records))
    reply = await raw_post(pod.url, call, headers)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert len(read_records(pod.records)) == before  # never reached the server
