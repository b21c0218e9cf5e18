"""Per-agent sidecar configuration: the Envoy bootstrap and the extension server's files. Pure.

Data flow::

    NamespaceView + MCPAgent
        ──agent_catalog──▶ Catalog of what the agent may use (its resolved servers,
                           its policies, the ConfigMaps and Secrets those reference)
        ──extproc.render.bootstrap.render_bootstrap_yaml (the renderer `up` uses)──▶ envoy.yaml
        ──documents──▶ resources.yaml, pipeline.yaml
        ──▶ ConfigMap mcp-agent-<agent>   (envoy.yaml, pipeline.yaml, resources.yaml)
            Secret    mcp-agent-<agent>   (resources.yaml, instead, when it holds Secrets)

The injected pod mounts both through one projected volume at ``/etc/mcp-extproc``.
"""

from __future__ import annotations

from typing import Any, Final

import yaml

from controller.render.meta import ControllerSettings, agent_object_name, object_meta, owner_ref
from controller.render.view import NamespaceView
from extproc.config.models import MCPAgent, Model
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions

CONFIG_DIR: Final = "/etc/mcp-extproc"


def serve_args(*listen: str) -> list[str]:
    """``mcp-extproc serve`` on the files this module writes (mounted at :data:`CONFIG_DIR`),
    listening where ``listen`` says (the injected sidecar and the shared server differ only there)."""
    return ["serve", "-f", f"{CONFIG_DIR}/resources.yaml", "--pipeline", f"{CONFIG_DIR}/pipeline.yaml", *listen]


def agent_catalog(view: NamespaceView, agent: MCPAgent) -> Catalog:
    """What ``agent`` may use, as a catalog that passes the local loader's reference checks."""
    catalog = view.catalog
    servers = {r.name: catalog.servers[r.name] for r in agent.spec.mcp_server_refs if r.name in catalog.servers}
    policies = {r.name: catalog.policies[r.name] for r in agent.spec.policy_refs if r.name in catalog.policies}
    for name, policy in catalog.policies.items():
        if name not in policies and any(t.name in servers for t in policy.spec.target_refs):
            policies[name] = policy
    # Policies may target servers the agent does not use: keep only the targets it has.
    trimmed = {}
    for name, policy in policies.items():
        targets = [t for t in policy.spec.target_refs if t.name in servers]
        if targets:
            trimmed[name] = policy.model_copy(update={"spec": policy.spec.model_copy(update={"target_refs": targets})})
    refs = [r for r in agent.spec.mcp_server_refs if r.name in servers]
    policy_refs = [r for r in agent.spec.policy_refs if r.name in trimmed]
    agent = agent.model_copy(
        update={"spec": agent.spec.model_copy(update={"mcp_server_refs": refs, "policy_refs": policy_refs})}
    )
    maps = {
        p.spec.rego.config_map_ref.name: catalog.config_maps[p.spec.rego.config_map_ref.name]
        for p in trimmed.values()
        if p.spec.rego is not None
        and p.spec.rego.config_map_ref is not None
        and p.spec.rego.config_map_ref.name in catalog.config_maps
    }
    secret_names = set()
    for server in servers.values():
        auth = server.spec.upstream_auth
        if auth is None:
            continue
        if auth.bearer is not None and auth.bearer.secret_ref is not None:
            secret_names.add(auth.bearer.secret_ref.name)
        for grant in (auth.client_credentials, auth.token_exchange):
            if grant is not None:
                secret_names.add(grant.client_secret_ref.name)
    secrets = {n: catalog.secrets[n] for n in sorted(secret_names) if n in catalog.secrets}
    return Catalog(
        servers=servers,
        policies=trimmed,
        agents={agent.name: agent} if servers else {},
        secrets=secrets,
        config_maps=maps,
        sources=(f"MCPAgent {agent.name!r}",),
    )


def sidecar_options(
    settings: ControllerSettings, max_bytes: int, fast_calls: frozenset[str] = frozenset()
) -> BootstrapOptions:
    """The injected Envoy: agents on 127.0.0.1:<sidecar_port>, admin on 127.0.0.1, ext_proc over the unix socket.

    ``fast_calls``: as ``up``'s default front door ``auto`` (see :mod:`extproc.render.fast_routes`);
    their ``Check`` goes over HTTP to the extension server's second socket in the same
    ``emptyDir``, as in ``up``.
    """
    return BootstrapOptions(
        fast_calls=fast_calls,
        listen_host="127.0.0.1",
        listen_port=settings.sidecar_port,
        admin_port=settings.admin_port,
        extproc_tcp=None,
        extproc_unix=settings.socket_path,
        max_request_bytes=max_bytes,
        authz_http_unix=settings.authz_socket_path if fast_calls else None,
    )


def documents(catalog: Catalog) -> list[dict[str, Any]]:
    """The catalog as resource documents (what ``mcp-extproc serve -f`` loads)."""
    items: list[Model] = [
        *catalog.servers.values(),
        *catalog.policies.values(),
        *catalog.agents.values(),
        *catalog.config_maps.values(),
        *catalog.secrets.values(),
    ]
    return [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in items]


def dump_documents(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML."""
    return yaml.safe_dump_all(docs, sort_keys=False)


def agent_config(
    view: NamespaceView, agent: MCPAgent, settings: ControllerSettings, pipeline: PipelineConfig = DEFAULT_PIPELINE
) -> list[dict[str, Any]]:
    """The ConfigMap (and, when credentials are referenced, the Secret) for ``agent``'s sidecar."""
    catalog = agent_catalog(view, agent)
    if not catalog.servers:
        return []
    plan = Registry().plan(pipeline)
    raw = view.raw[("MCPAgent", agent.name)]
    name = agent_object_name(agent.name)
    meta = object_meta(name, view.namespace, [owner_ref(raw)], f"MCPAgent.{agent.name}")
    resources = dump_documents(documents(catalog))
    data = {
        "envoy.yaml": render_bootstrap_yaml(
            catalog, plan.needs, sidecar_options(settings, plan.max_request_bytes, plan.fast_call_eras)
        ),
        "pipeline.yaml": yaml.safe_dump(pipeline.model_dump(mode="json", by_alias=True), sort_keys=False),
    }
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}]
    if catalog.secrets:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": meta,
                "type": "Opaque",
                "stringData": {"resources.yaml": resources},
            }
        )
    else:
        data["resources.yaml"] = resources
    return objects
