"""``Catalog.subset``: a smaller catalog holding some servers and only what they reference.

The controller copies such a catalog into a sidecar or the shared extension server,
so a Secret or ConfigMap kept by mistake would end up somewhere it is not needed.
"""

from __future__ import annotations

from typing import Any

from extproc.config.resources import Catalog, parse_documents, reference_problems

V1A1 = "mcp.extproc.io/v1alpha1"
IDENTITY = {"jwt": {"issuer": "https://idp.test", "audiences": ["mcp"], "jwksUri": "https://idp.test/jwks"}}
REGO = "package mcp\nallow := true"


def server(name: str, auth: dict[str, Any]) -> dict[str, Any]:
    spec = {"url": f"http://{name}.test/mcp", "upstreamAuth": auth}
    return {"apiVersion": V1A1, "kind": "MCPServer", "metadata": {"name": name}, "spec": spec}


def grant(secret: str) -> dict[str, Any]:
    return {"tokenUrl": "https://idp.test/token", "clientId": "c", "clientSecretRef": {"name": secret, "key": "s"}}


def policy(name: str, targets: list[str], config_map: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"targetRefs": [{"name": t} for t in targets], "rules": [{"tools": ["*"]}]}
    if config_map is not None:
        spec["rego"] = {"configMapRef": {"name": config_map, "key": "policy.rego"}}
    return {"apiVersion": V1A1, "kind": "MCPToolPolicy", "metadata": {"name": name}, "spec": spec}


def agent(name: str, servers: list[str], policies: tuple[str, ...] = ()) -> dict[str, Any]:
    spec = {
        "mcpServerRefs": [{"name": s} for s in servers],
        "policyRefs": [{"name": p} for p in policies],
        "identity": IDENTITY,
    }
    return {"apiVersion": V1A1, "kind": "MCPAgent", "metadata": {"name": name}, "spec": spec}


def core(kind: str, name: str) -> dict[str, Any]:
    data = {"stringData": {"s": "x"}} if kind == "Secret" else {"data": {"policy.rego": REGO}}
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}, **data}


DOCS = [
    server("bearer", {"bearer": {"secretRef": {"name": "bearer-token", "key": "s"}}}),
    server("oauth", {"clientCredentials": grant("oauth-client")}),
    server("exchange", {"tokenExchange": grant("exchange-client")}),
    server("env", {"bearer": {"env": "TOKEN"}}),
    policy("z-both", ["bearer", "oauth"], "both-rego"),
    policy("a-oauth", ["oauth"], "oauth-rego"),
    policy("m-exchange", ["exchange"]),
    agent("agent", ["oauth", "ghost", "env"], ("m-exchange", "z-both")),
    agent("elsewhere", ["exchange"]),
    *(core("Secret", n) for n in ("bearer-token", "oauth-client", "exchange-client", "unused")),
    *(core("ConfigMap", n) for n in ("both-rego", "oauth-rego", "unused-rego")),
]


def catalog() -> Catalog:
    return parse_documents(DOCS, "resources.yaml")


def targets(sub: Catalog, policy: str) -> list[str]:
    return [t.name for t in sub.policies[policy].spec.target_refs]


def test_keeps_the_servers_given_in_order_and_skips_unknown_names() -> None:
    sub = catalog().subset(["oauth", "ghost", "bearer", "oauth"])
    assert list(sub.servers) == ["oauth", "bearer"]
    assert sub.agents == {}
    assert sub.sources == ()
    assert sub.generation == 0


def test_keeps_only_the_secrets_the_kept_servers_upstream_auth_references() -> None:
    full = catalog()
    assert list(full.subset(["bearer"]).secrets) == ["bearer-token"]
    assert list(full.subset(["oauth"]).secrets) == ["oauth-client"]
    assert list(full.subset(["exchange"]).secrets) == ["exchange-client"]
    assert full.subset(["env"]).secrets == {}  # a bearer token from the environment needs no Secret
    assert list(full.subset(["oauth", "exchange", "bearer"]).secrets) == [
        "bearer-token",
        "exchange-client",
        "oauth-client",
    ]  # sorted by name
    assert "unused" not in full.subset(list(full.servers)).secrets


def test_a_referenced_secret_that_does_not_exist_is_left_out() -> None:
    full = catalog()
    without = Catalog(servers=full.servers, secrets={k: v for k, v in full.secrets.items() if k != "oauth-client"})
    assert without.subset(["oauth", "bearer"]).secrets.keys() == {"bearer-token"}


def test_keeps_the_policies_targeting_kept_servers_trimmed_to_them() -> None:
    sub = catalog().subset(["oauth"])
    assert list(sub.policies) == ["z-both", "a-oauth"]  # catalog order
    assert targets(sub, "z-both") == ["oauth"]  # "bearer" is not kept
    assert targets(sub, "a-oauth") == ["oauth"]
    assert "m-exchange" not in sub.policies  # targets only a server not kept
    assert targets(catalog(), "z-both") == ["bearer", "oauth"]  # the original is untouched


def test_keeps_only_the_config_maps_of_kept_policies() -> None:
    full = catalog()
    assert list(full.subset(["oauth"]).config_maps) == ["both-rego", "oauth-rego"]
    assert list(full.subset(["bearer"]).config_maps) == ["both-rego"]
    assert full.subset(["exchange", "env"]).config_maps == {}
    assert "unused-rego" not in full.subset(list(full.servers)).config_maps


def test_an_agent_is_trimmed_to_what_is_kept_and_its_policies_come_first() -> None:
    full = catalog()
    agent = full.agents["agent"]
    sub = full.subset([r.name for r in agent.spec.mcp_server_refs], agents=[agent], sources=("MCPAgent 'agent'",))
    assert list(sub.servers) == ["oauth", "env"]
    # Its own policy references first (m-exchange targets no kept server: dropped), then the others.
    assert list(sub.policies) == ["z-both", "a-oauth"]
    kept = sub.agents["agent"]
    assert [r.name for r in kept.spec.mcp_server_refs] == ["oauth", "env"]
    assert [r.name for r in kept.spec.policy_refs] == ["z-both"]
    assert list(sub.secrets) == ["oauth-client"]
    assert list(sub.config_maps) == ["both-rego", "oauth-rego"]
    assert "elsewhere" not in sub.agents
    assert sub.sources == ("MCPAgent 'agent'",)
    assert reference_problems(sub) == []  # passes the local loader's checks


def test_an_agent_without_any_kept_server_is_dropped() -> None:
    full = catalog()
    sub = full.subset(["bearer"], agents=[full.agents["elsewhere"]])
    assert sub.agents == {}
    assert list(sub.servers) == ["bearer"]


def test_nothing_kept() -> None:
    full = catalog()
    sub = full.subset([], agents=[full.agents["agent"]])
    assert (sub.servers, sub.policies, sub.agents, sub.secrets, sub.config_maps) == ({}, {}, {}, {}, {})
