"""Everything the controller applies for one namespace, from its resources. Pure.

Data flow::

    NamespaceView
      MCPAgent (Sidecar) ──▶ ConfigMap/Secret mcp-agent-<a> (sidecar.py) + NetworkPolicies (netpol.py)
      MCPAgent (Istio)   ──▶ EnvoyFilter mcp-agent-<a> (istio.py)       + NetworkPolicies
      MCPServer.gateway  ──▶ HTTPRoute mcp-<s> (gateway.py)
      any Gateway route or Istio agent ──▶ shared extension server (extserver.py)
                                           + EnvoyExtensionPolicy when routes exist
      any of those extension servers   ──▶ session_keys = True: they mount the Secret
                                           mcp-extproc-session-keys, which the runtime
                                           creates (session_keys.py; never rendered here)
    ──▶ Rendered(objects, problems by (kind, name))

``mcp-extproc render k8s`` prints ``objects``; the reconcile loop applies them,
prunes what it no longer renders and writes ``problems`` into status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.render import extserver, gateway, istio, netpol, sidecar
from controller.render.meta import ControllerSettings
from controller.render.view import Key, NamespaceView, build_view, group_by_namespace
from extproc.config.models import MCPAgent, MCPServer
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig
from extproc.config.resources import Catalog
from extproc.core.registry import Registry


@dataclass(frozen=True)
class Rendered:
    """Objects to apply and, per custom resource, what could not be resolved or rendered.

    ``session_keys``: an extension server of the namespace (a sidecar, the shared one)
    mounts the session key Secret, which must therefore exist
    (:mod:`controller.render.session_keys`; the renderers never make one).
    """

    objects: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[Key, list[str]] = field(default_factory=dict)
    session_keys: bool = False


def render_namespace(
    view: NamespaceView, settings: ControllerSettings, pipeline: PipelineConfig = DEFAULT_PIPELINE
) -> Rendered:
    """Render every object for one namespace."""
    problems: dict[Key, list[str]] = {k: list(v) for k, v in view.unresolved.items()}
    objects: list[dict[str, Any]] = []
    needs = Registry().plan(pipeline).needs
    catalog = view.catalog
    shared: dict[str, MCPServer] = {}
    serves = False  # some extension server here mounts the session key Secret
    for name, agent in sorted(catalog.agents.items()):
        key = ("MCPAgent", name)
        servers = [catalog.servers[n] for n in _server_names(catalog, agent) if n in catalog.servers]
        selector = agent.spec.selector
        if selector is None:
            problems.setdefault(key, []).append("spec.selector: required in a cluster (which pods are the agent?)")
            continue
        if agent.spec.attachment == "Sidecar":
            configs = sidecar.agent_config(view, agent, settings, pipeline)
            objects += configs
            serves |= bool(configs)
        else:
            envoy_filter, problem = istio.envoy_filter(view, agent, servers, needs, settings)
            if problem:
                problems.setdefault(key, []).append(problem)
            if envoy_filter is not None:
                objects.append(envoy_filter)
                shared.update({s.name: s for s in servers})
        policies, np_problems = netpol.network_policies(view.raw[key], selector, servers, view.services)
        objects += policies
        problems.setdefault(key, []).extend(np_problems)
    routed: list[MCPServer] = []
    for name, server in sorted(catalog.servers.items()):
        route, problem = gateway.http_route(view, server)
        if problem:
            problems.setdefault(("MCPServer", name), []).append(problem)
        if route is not None:
            objects.append(route)
            routed.append(server)
            shared[name] = server
    servers_used = [shared[n] for n in sorted(shared)]
    shared_server = extserver.extension_server(view, servers_used, settings, pipeline)
    objects += shared_server
    if routed:
        objects.append(gateway.extension_policy(view, routed, settings))
    return Rendered(objects, {k: v for k, v in problems.items() if v}, serves or bool(shared_server))


def render_documents(
    documents: Iterable[Mapping[str, Any]],
    settings: ControllerSettings,
    services: Mapping[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[str, tuple[NamespaceView, Rendered]]:
    """Render resource documents (``render k8s -f FILE``), namespace by namespace."""
    out: dict[str, tuple[NamespaceView, Rendered]] = {}
    for namespace, docs in sorted(group_by_namespace(documents).items()):
        view = build_view(namespace, docs, services)
        out[namespace] = (view, render_namespace(view, settings))
    return out


def _server_names(catalog: Catalog, agent: MCPAgent) -> list[str]:
    """The servers ``agent`` reaches: those it references, and the backends of its virtual servers."""
    names: list[str] = []
    for ref in agent.spec.mcp_server_refs:
        virtual = catalog.virtual_servers.get(ref.name) if ref.kind == "MCPVirtualServer" else None
        for name in [b.name for b in virtual.spec.servers] if virtual is not None else [ref.name]:
            if name not in names:
                names.append(name)
    return names
