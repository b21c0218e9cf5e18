"""Resource documents for the controller tests."""

from __future__ import annotations

from typing import Any

NS = "agents"


def server(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": {"url": url, "allowedTools": ["*"], **spec},
    }


def agent(name: str, servers: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAgent",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 3},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "mcpServerRefs": [{"name": s} for s in servers],
            "identity": {
                "jwt": {"issuer": "https://issuer.test", "audiences": ["mcp"], "jwksUri": "https://issuer.test/jwks"}
            },
            **spec,
        },
    }


def secret(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "stringData": data}
