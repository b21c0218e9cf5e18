"""The policy stage with a remote OPA (the stand-in, ``tests.upstreams.opa_standin``, as a process).

Requests go through the ext_proc adapter with the default pipeline and real
signed tokens; the assertions are on what the agent would get back.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from extproc.core.pipeline import Pipeline
from tests.idp import Idp
from tests.policies import REGO, call, catalog_of, policy_doc, refused, send
from tests.procs import start_opa_standin

pytestmark = pytest.mark.integration


def standin_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_requests", timeout=5) as reply:
        return int(json.loads(reply.read())["count"])


async def test_remote_opa_decides_and_decisions_are_cached(pipeline: Pipeline, idp: Idp, tmp_path: Path) -> None:
    module = tmp_path / "policy.rego"
    module.write_text(REGO)
    standin, port = start_opa_standin(module)
    try:
        remote = {"query": "data.mcp.allow", "remote": {"url": f"http://127.0.0.1:{port}"}}
        catalog = catalog_of(idp, policy_doc([], rego=remote))
        token = idp.mint()
        refused((await send(pipeline, catalog, token, call("add", {"a": 500})))[1])
        assert (await send(pipeline, catalog, token, call("add", {"a": 5})))[1].HasField("request_body")
        assert standin_count(port) == 2
        for _ in range(3):
            assert (await send(pipeline, catalog, token, call("add", {"a": 5})))[1].HasField("request_body")
        assert standin_count(port) == 2, "repeated decisions come from the cache"
    finally:
        standin.stop()
