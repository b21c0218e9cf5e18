"""NetworkPolicies limiting an agent's pods to DNS and the MCP servers it references. Pure.

Data flow::

    MCPAgent selector ──▶ NetworkPolicy mcp-agent-<agent>-default-deny   (Egress, no rules)
    referenced MCPServer URLs ──egress_rule──▶ one rule each, deduplicated
        in-cluster Service (<svc>.<ns>.svc[.cluster.local])
            → namespaceSelector kubernetes.io/metadata.name=<ns> + the pod port
              (the Service's targetPort when the Service is known: a NetworkPolicy
              matches pod ports, not Service ports). Never ipBlock: under Cilium an
              ipBlock does not match pods.
        external host on port 443 → one shared "TCP 443 anywhere" rule
        external host on another port → "TCP <port> anywhere" (the sidecar enforces the host)
    + DNS (UDP/TCP 53 to kube-dns)  ──▶ NetworkPolicy mcp-agent-<agent>-egress

A URL that cannot be turned into a rule is reported (status), never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from controller.render.meta import agent_object_name, object_meta, owner_ref
from extproc.config.models import LabelSelector, MCPServer

NAMESPACE_LABEL: Final = "kubernetes.io/metadata.name"
DNS_RULE: Final = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


@dataclass(frozen=True)
class ServiceHost:
    """An in-cluster Service named by a URL host."""

    name: str
    namespace: str


def service_host(host: str) -> ServiceHost | None:
    """``<svc>.<ns>.svc`` or ``<svc>.<ns>.svc.cluster.local`` → the Service; anything else → None."""
    labels = host.rstrip(".").lower().split(".")
    if (len(labels) == 3 and labels[2] == "svc") or (len(labels) == 5 and labels[2:] == ["svc", "cluster", "local"]):
        return ServiceHost(labels[0], labels[1])
    return None


def _target_port(service: Mapping[str, Any] | None, port: int) -> int | str:
    """The pod port behind ``port`` of ``service`` (a number or a named container port)."""
    for entry in (service or {}).get("spec", {}).get("ports", []):
        if entry.get("port") == port:
            target = entry.get("targetPort", port)
            return int(target) if isinstance(target, int) or str(target).isdigit() else str(target)
    return port


def egress_rule(
    server: MCPServer, services: Mapping[tuple[str, str], Mapping[str, Any]]
) -> tuple[dict[str, Any] | None, str | None]:
    """One egress rule for ``server``, or a problem saying why there is none."""
    try:
        url = urlsplit(server.spec.url)
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as exc:
        return None, f"spec.url: cannot derive an egress rule: {exc}"
    host = url.hostname
    if not host:
        return None, "spec.url: cannot derive an egress rule: no host"
    svc = service_host(host)
    if svc is not None:
        target = _target_port(services.get((svc.namespace, svc.name)), port)
        return {
            "to": [{"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: svc.namespace}}}],
            "ports": [{"protocol": "TCP", "port": target}],
        }, None
    return {"ports": [{"protocol": "TCP", "port": port}]}, None


def pod_selector(selector: LabelSelector) -> dict[str, Any]:
    """A model selector as a Kubernetes ``LabelSelector`` dict."""
    out: dict[str, Any] = {}
    if selector.match_labels:
        out["matchLabels"] = dict(selector.match_labels)
    if selector.match_expressions:
        out["matchExpressions"] = [
            e.model_dump(by_alias=True, exclude_defaults=True) for e in selector.match_expressions
        ]
    return out


def network_policies(
    agent_raw: Mapping[str, Any],
    selector: LabelSelector,
    servers: list[MCPServer],
    services: Mapping[tuple[str, str], Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """The default-deny and the allow policy for one agent, and the problems found."""
    meta = agent_raw["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    owners = [owner_ref(dict(agent_raw))]
    problems: list[str] = []
    rules: dict[str, dict[str, Any]] = {json.dumps(DNS_RULE, sort_keys=True): DNS_RULE}
    for server in servers:
        rule, problem = egress_rule(server, services)
        if problem:
            problems.append(f"MCPServer {server.name!r}: {problem}")
        if rule is not None:
            rules.setdefault(json.dumps(rule, sort_keys=True), rule)
    base = agent_object_name(name)
    label = f"MCPAgent.{name}"
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(f"{base}-default-deny", namespace, owners, label),
        "spec": {"podSelector": pod_selector(selector), "policyTypes": ["Egress"]},
    }
    allow = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(f"{base}-egress", namespace, owners, label),
        "spec": {
            "podSelector": pod_selector(selector),
            "policyTypes": ["Egress"],
            "egress": [rules[k] for k in sorted(rules)],
        },
    }
    return [deny, allow], problems
