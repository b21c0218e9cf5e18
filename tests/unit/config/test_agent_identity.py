"""``MCPAgent.spec.identity``: optional, and when written, something that identifies."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from extproc.config.models import MCPAgent
from extproc.config.resources import parse_documents
from extproc.errors import ConfigError
from tests.messages import SERVER_DOC


def agent(name: str = "assistant", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAgent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mcpServerRefs": [{"name": "demo"}], **spec},
    }


def test_an_agent_may_leave_its_identity_out() -> None:
    catalog = parse_documents([SERVER_DOC, agent(selector={"matchLabels": {"app": "assistant"}})], "test")
    parsed = catalog.agents["assistant"]
    assert (parsed.spec.identity, parsed.jwt, parsed.spiffe_id) == (None, None, None)
    assert catalog.lone_agent_without_identity() is parsed


def test_only_the_lone_agent_without_identity_is_the_workload() -> None:
    two = parse_documents([SERVER_DOC, agent("a"), agent("b")], "test")
    assert two.lone_agent_without_identity() is None
    known = parse_documents([SERVER_DOC, agent(identity={"serviceAccount": "a"})], "test")
    assert known.lone_agent_without_identity() is None


def test_a_service_account_is_a_spiffe_id_in_the_agents_namespace() -> None:
    parsed = MCPAgent.model_validate(agent(namespace="agents", identity={"serviceAccount": "robot"}))
    assert parsed.spiffe_id == "spiffe://cluster.local/ns/agents/sa/robot"
    other = MCPAgent.model_validate(agent(identity={"serviceAccount": "robot", "trustDomain": "example.org"}))
    assert other.spiffe_id == "spiffe://example.org/ns/default/sa/robot"


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ({}, "set jwt, serviceAccount or both"),
        ({"trustDomain": "cluster.local"}, "set jwt, serviceAccount or both"),
        ({"serviceAccount": "Robot"}, "spec.identity.serviceAccount"),
        ({"serviceAccount": "a/sa/b"}, "spec.identity.serviceAccount"),
        ({"serviceAccount": "robot", "trustDomain": "evil/ns/x"}, "spec.identity.trustDomain"),
        ({"spiffe": "spiffe://x"}, "spec.identity.spiffe"),
    ],
)
def test_an_identity_that_identifies_nobody_is_refused(identity: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_documents([SERVER_DOC, agent(identity=identity)], "test")
    with pytest.raises(ValidationError):
        MCPAgent.model_validate(agent(identity=identity))
