"""The policy stage tests' documents and exchange: a policy, a catalog with a signed-token agent,
a tools/call, sent through the ext_proc front door with a bearer token, and the refusal read back."""

from __future__ import annotations

import json
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config.resources import Catalog, parse_documents
from extproc.core.pipeline import Pipeline
from extproc.frontdoor.ext_proc import Processor
from tests.idp import Idp, agent_doc
from tests.messages import SERVER_DOC, body_msg, headers_msg, post_headers

REGO = """package mcp
import rego.v1
default allow := true
allow := false if { input.tool == "add"; input.arguments.a > 100 }
"""


def policy_doc(rules: list[dict[str, Any]], *, rego: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"targetRefs": [{"kind": "MCPServer", "name": "demo"}], "rules": rules, **spec}
    if rego is not None:
        body["rego"] = rego
    return {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPToolPolicy", "metadata": {"name": "p"}, "spec": body}


SERVER = {**SERVER_DOC, "spec": {**SERVER_DOC["spec"], "allowedTools": ["*"], "deniedTools": []}}  # type: ignore[dict-item]


def catalog_of(idp: Idp, policy: dict[str, Any], granted: str = "medium") -> Catalog:
    return parse_documents([SERVER, policy, agent_doc("agent", idp.jwks_uri, ["demo"], granted=granted)], "test")


def call(tool: str, arguments: dict[str, Any] | None = None, id_: int = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool, "arguments": arguments or {}}}


async def send(pipeline: Pipeline, catalog: Catalog, token: str, body: Any) -> tuple[Processor, pb.ProcessingResponse]:
    proc = Processor(pipeline, catalog)
    first = await proc.handle(headers_msg(post_headers(authorization=f"Bearer {token}")))
    assert first.HasField("request_headers"), first
    return proc, await proc.handle(body_msg(body))


def refused(response: pb.ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert response.HasField("immediate_response"), "expected a refusal"
    answer = response.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in answer.headers.set_headers}
    return answer.status.code, headers, json.loads(answer.body)
