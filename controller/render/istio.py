"""Istio mode: an ``EnvoyFilter`` inserting ext_proc into the agent pods' Istio sidecar. Pure.

Data flow::

    MCPAgent (attachment: Istio, selector.matchLabels) + its resolved MCPServers
        ──▶ EnvoyFilter mcp-agent-<agent> (workloadSelector = the agent's labels):
            1. HTTP_FILTER, SIDECAR_OUTBOUND: ext_proc inserted before the router,
               *disabled* by default (other outbound traffic is untouched), pointing at
               the shared extension server's Service cluster; the filter itself is the
               one ``extproc.render.bootstrap`` renders for ``up`` (same processing mode),
               with a retry on another replica of a stream whose connection failed.
            2. VIRTUAL_HOST per server (``<host>:<port>``): ext_proc enabled, with the
               server's name as gRPC initial metadata (how the server is found when the
               agent uses the server's own URL rather than ``/<name>/mcp``).
"""

from __future__ import annotations

import copy
from typing import Any, Final
from urllib.parse import urlsplit

from controller.render.meta import EXTPROC_NAME, ControllerSettings, agent_object_name, object_meta, owner_ref
from controller.render.netpol import service_host
from controller.render.view import NamespaceView
from extproc.config.models import MCPAgent, MCPServer
from extproc.config.resources import Catalog
from extproc.render.bootstrap import bootstrap_dict
from extproc.render.options import BootstrapOptions, PhaseNeeds
from extproc.render.replicas import retry_policy
from extproc.render.wire import SERVER_METADATA_KEY

_T: Final = "type.googleapis.com/"
EXT_PROC_FILTER: Final = "envoy.filters.http.ext_proc"


def istio_cluster(namespace: str, settings: ControllerSettings) -> str:
    """Istio's outbound cluster for the shared extension server's Service."""
    return f"outbound|{settings.grpc_port}||{EXTPROC_NAME}.{namespace}.svc.cluster.local"


def vhost_name(server: MCPServer) -> str:
    """Istio's outbound virtual host name for the server's URL (``<fqdn>:<port>``)."""
    url = urlsplit(server.spec.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    host = url.hostname or ""
    svc = service_host(host)
    if svc is not None:
        host = f"{svc.name}.{svc.namespace}.svc.cluster.local"
    return f"{host}:{port}"


def ext_proc_http_filter(catalog: Catalog, needs: PhaseNeeds, cluster: str) -> dict[str, Any]:
    """The ext_proc HTTP filter exactly as ``up`` renders it, aimed at ``cluster`` and disabled by default."""
    hcm = bootstrap_dict(catalog, needs, BootstrapOptions())["static_resources"]["listeners"][0]["filter_chains"][0]
    found = next(f for f in hcm["filters"][0]["typed_config"]["http_filters"] if f["name"] == EXT_PROC_FILTER)
    http_filter = copy.deepcopy(found)
    http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
    # The Service's replicas are the cluster's endpoints: a stream whose replica is gone is
    # tried once more on another (as `render envoy` does with several addresses).
    http_filter["typed_config"]["grpc_service"]["retry_policy"] = retry_policy(grpc=True)
    http_filter["disabled"] = True
    return dict(http_filter)


def vhost_patch(server: MCPServer) -> dict[str, Any]:
    """The virtual host fields that enable ext_proc for ``server`` and name it."""
    return {
        "typed_per_filter_config": {
            EXT_PROC_FILTER: {
                "@type": _T + "envoy.config.route.v3.FilterConfig",
                "config": {
                    "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "overrides": {"grpc_initial_metadata": [{"key": SERVER_METADATA_KEY, "value": server.name}]},
                },
            }
        }
    }


def envoy_filter(
    view: NamespaceView,
    agent: MCPAgent,
    servers: list[MCPServer],
    needs: PhaseNeeds,
    settings: ControllerSettings,
) -> tuple[dict[str, Any] | None, str | None]:
    """The agent's EnvoyFilter, or why there is none."""
    selector = agent.spec.selector
    if selector is None or not selector.match_labels or selector.match_expressions:
        return None, "spec.selector: Istio attachment needs a selector with matchLabels only (workloadSelector)"
    if not servers or not (needs.request_headers or needs.response_headers):
        return None, None
    catalog = view.catalog.subset(s.name for s in servers)
    patches: list[dict[str, Any]] = [
        {
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "SIDECAR_OUTBOUND",
                "listener": {
                    "filterChain": {
                        "filter": {
                            "name": "envoy.filters.network.http_connection_manager",
                            "subFilter": {"name": "envoy.filters.http.router"},
                        }
                    }
                },
            },
            "patch": {
                "operation": "INSERT_BEFORE",
                "value": ext_proc_http_filter(catalog, needs, istio_cluster(view.namespace, settings)),
            },
        }
    ]
    for server in servers:
        patches.append(
            {
                "applyTo": "VIRTUAL_HOST",
                "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {"vhost": {"name": vhost_name(server)}}},
                "patch": {"operation": "MERGE", "value": vhost_patch(server)},
            }
        )
    raw = view.raw[("MCPAgent", agent.name)]
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": object_meta(
            agent_object_name(agent.name), view.namespace, [owner_ref(raw)], f"MCPAgent.{agent.name}"
        ),
        "spec": {"workloadSelector": {"labels": dict(selector.match_labels)}, "configPatches": patches},
    }, None
