"""NetworkPolicies: default-deny egress, DNS, one deduplicated rule per referenced server."""

from __future__ import annotations

from typing import Any

from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from controller.render.netpol import DNS_RULE
from tests.kubedocs import NS, agent, server
from tests.kubeschemas import validate_any


def render(*docs: dict[str, Any], services: dict[tuple[str, str], dict[str, Any]] | None = None) -> Any:
    [(view, rendered)] = render_documents(list(docs), ControllerSettings(), services).values()
    for obj in rendered.objects:
        validate_any(obj)
    return view, rendered, {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects}


def test_default_deny_and_one_rule_per_server_deduplicated() -> None:
    _view, rendered, out = render(
        server("a", "http://tools.mcp.svc:8080/mcp"),
        server("b", "http://tools.mcp.svc.cluster.local:8080/other"),  # same Service and port as a
        server("c", "https://one.example.test/mcp"),
        server("d", "https://two.example.test:443/mcp"),  # 443 again: the same single rule
        server("e", "http://plain.example.test:8081/mcp"),
        server("f", "http://web.team-b.svc/mcp"),
        agent("assistant", ["a", "b", "c", "d", "e", "f"]),
    )
    deny = out[("NetworkPolicy", "mcp-agent-assistant-default-deny")]["spec"]
    assert deny == {"podSelector": {"matchLabels": {"app": "assistant"}}, "policyTypes": ["Egress"]}
    allow = out[("NetworkPolicy", "mcp-agent-assistant-egress")]["spec"]
    assert allow["podSelector"] == {"matchLabels": {"app": "assistant"}}
    rules = allow["egress"]
    ns = "kubernetes.io/metadata.name"
    assert sorted(map(str, rules)) == sorted(
        map(
            str,
            [
                DNS_RULE,
                {
                    "to": [{"namespaceSelector": {"matchLabels": {ns: "mcp"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                },
                {
                    "to": [{"namespaceSelector": {"matchLabels": {ns: "team-b"}}}],
                    "ports": [{"protocol": "TCP", "port": 80}],
                },
                {"ports": [{"protocol": "TCP", "port": 443}]},
                {"ports": [{"protocol": "TCP", "port": 8081}]},
            ],
        )
    )
    assert all("ipBlock" not in str(rule) for rule in rules)  # ipBlock never matches pods under Cilium
    assert rendered.problems == {}


def test_service_target_port_is_used_when_the_service_is_known() -> None:
    services: dict[tuple[str, str], dict[str, Any]] = {
        ("mcp", "tools"): {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}},
        ("mcp", "named"): {"spec": {"ports": [{"port": 80, "targetPort": "http-mcp"}]}},
    }
    _view, _rendered, out = render(
        server("a", "http://tools.mcp.svc/mcp"),
        server("b", "http://named.mcp.svc/mcp"),
        agent("assistant", ["a", "b"]),
        services=services,
    )
    ports = [r["ports"] for r in out[("NetworkPolicy", "mcp-agent-assistant-egress")]["spec"]["egress"] if "to" in r]
    assert [{"protocol": "TCP", "port": 8080}] in ports
    assert [{"protocol": "TCP", "port": "http-mcp"}] in ports


def test_missing_and_invalid_referents_are_reported_not_fatal() -> None:
    bad = server("broken", "ftp://nowhere/mcp")
    view, rendered, out = render(
        server("a", "https://one.example.test/mcp"),
        bad,
        agent("assistant", ["a", "ghost", "broken"]),
    )
    assert ("MCPServer", "broken") in view.invalid
    assert "http:// or https://" in view.invalid[("MCPServer", "broken")]
    problems = rendered.problems[("MCPAgent", "assistant")]
    assert any("no MCPServer named 'ghost'" in p for p in problems)
    assert any("no MCPServer named 'broken'" in p for p in problems)
    # The agent still gets its policies, for the server that resolves.
    egress = out[("NetworkPolicy", "mcp-agent-assistant-egress")]["spec"]["egress"]
    assert {"ports": [{"protocol": "TCP", "port": 443}]} in egress


def test_agent_without_selector_selects_nothing() -> None:
    doc = agent("assistant", ["a"])
    del doc["spec"]["selector"]
    _view, rendered, out = render(server("a", "https://one.example.test/mcp"), doc)
    assert not [k for k in out if k[0] == "NetworkPolicy"]  # never an empty podSelector (= every pod)
    assert "spec.selector" in rendered.problems[("MCPAgent", "assistant")][0]
    assert NS == "agents"
