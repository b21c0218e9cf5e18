"""Per-agent sidecar configuration: the Envoy bootstrap and the extension server's files. Pure.

Data flow::

    NamespaceView + MCPAgent
        ──agent_catalog──▶ Catalog of what the agent may use (its resolved servers,
                           its policies, the ConfigMaps and Secrets those reference,
                           the MCPAccessGrants and MCPConsents of its servers and
                           virtual servers: the extension server decides with them)
        ──extproc.render.bootstrap.render_bootstrap_yaml (the renderer `up` uses)──▶ envoy.yaml
        ──documents──▶ resources.yaml, pipeline.yaml (an agent without spec.identity: the
                       authn stage's workloadAgent names it, for the pod is that agent)
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
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, with_stage_config
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
    servers = [r.name for r in agent.spec.mcp_server_refs]
    return view.catalog.subset(servers, agents=[agent], sources=(f"MCPAgent {agent.name!r}",))


def sidecar_options(
    settings: ControllerSettings, max_bytes: int, fast_calls: frozenset[str] = frozenset()
) -> BootstrapOptions:
    """The injected Envoy: agents on 127.0.0.1:<sidecar_port>; admin and ext_proc on unix sockets in the ``emptyDir``.

    ``fast_calls``: as ``up``'s default front door ``auto`` (see :mod:`extproc.render.fast_routes`);
    their ``Check`` goes over HTTP to the extension server's second socket in the same
    ``emptyDir``, as in ``up``.
    """
    return BootstrapOptions(
        fast_calls=fast_calls,
        listen_host="127.0.0.1",
        listen_port=settings.sidecar_port,
        admin_socket=settings.admin_socket_path,
        extproc_tcp=None,
        extproc_unix=settings.socket_path,
        max_request_bytes=max_bytes,
        authz_http_unix=settings.authz_socket_path if fast_calls else None,
        streams_unix=settings.streams_socket_path,
    )


def documents(catalog: Catalog) -> list[dict[str, Any]]:
    """The catalog as resource documents (what ``mcp-extproc serve -f`` loads)."""
    items: list[Model] = [
        *catalog.servers.values(),
        *catalog.policies.values(),
        *catalog.agents.values(),
        *catalog.virtual_servers.values(),
        *catalog.grants.values(),
        *catalog.consents.values(),
        *catalog.config_maps.values(),
        *catalog.secrets.values(),
    ]
    return [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in items]


def dump_documents(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML."""
    return yaml.safe_dump_all(docs, sort_keys=False)


def sidecar_pipeline(pipeline: PipelineConfig, agent: MCPAgent) -> PipelineConfig:
    """``pipeline`` as ``agent``'s sidecar runs it: without ``spec.identity``, the agent is
    authn's ``workloadAgent`` (only the pod's containers reach the sidecar's loopback listener)."""
    if agent.spec.identity is not None:
        return pipeline
    return with_stage_config(pipeline, "authn", workloadAgent=agent.name)


def agent_config(
    view: NamespaceView, agent: MCPAgent, settings: ControllerSettings, pipeline: PipelineConfig = DEFAULT_PIPELINE
) -> list[dict[str, Any]]:
    """The ConfigMap (and, when credentials are referenced, the Secret) for ``agent``'s sidecar."""
    catalog = agent_catalog(view, agent)
    if not catalog.servers:
        return []
    pipeline = sidecar_pipeline(pipeline, agent)
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
