"""Gateway mode: an ``HTTPRoute`` per exposed MCPServer and an Envoy Gateway ``EnvoyExtensionPolicy``. Pure.

Data flow::

    MCPServer with spec.gateway (url → in-cluster Service)
        ──▶ HTTPRoute mcp-<server>: Exact /<server>/mcp on the Gateway's listeners,
            rewritten to the server's own path, backend = that Service and port
    all those routes ──▶ EnvoyExtensionPolicy mcp-extproc: ext_proc to the shared
        extension server's Service (request body buffered, responses' headers sent,
        per-exchange mode override allowed, fail closed; a replica whose connection
        fails is ejected from the Service's endpoints at once: passive health check)

The extension server finds the MCPServer from the path ``/<server>/mcp``, which
ext_proc sees before the route's rewrite. Only in-cluster Service URLs can be
routed (an external host needs an Envoy Gateway ``Backend``): others are
reported in status.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from controller.render.meta import EXTPROC_NAME, ControllerSettings, object_meta, owner_ref
from controller.render.netpol import service_host
from controller.render.view import NamespaceView
from extproc.config.models import MCPServer

GATEWAY_GROUP: Final = "gateway.networking.k8s.io"


def route_name(server: MCPServer) -> str:
    """The HTTPRoute of ``server``."""
    return f"mcp-{server.name}"


def http_route(view: NamespaceView, server: MCPServer) -> tuple[dict[str, Any] | None, str | None]:
    """The HTTPRoute exposing ``server``, or why there is none."""
    exposure = server.spec.gateway
    if exposure is None:
        return None, None
    url = urlsplit(server.spec.url)
    svc = service_host(url.hostname or "")
    if svc is None:
        return None, (
            f"spec.gateway: {url.hostname!r} is not an in-cluster Service (<svc>.<ns>.svc[.cluster.local]); "
            "Gateway mode routes only to Services"
        )
    port = url.port or (443 if url.scheme == "https" else 80)
    parents = []
    for ref in exposure.parent_refs:
        parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": ref.name}
        if ref.namespace:
            parent["namespace"] = ref.namespace
        if ref.section_name:
            parent["sectionName"] = ref.section_name
        parents.append(parent)
    backend: dict[str, Any] = {"group": "", "kind": "Service", "name": svc.name, "port": port}
    if svc.namespace != view.namespace:
        backend["namespace"] = svc.namespace  # needs a ReferenceGrant in that namespace
    spec: dict[str, Any] = {
        "parentRefs": parents,
        "rules": [
            {
                "matches": [{"path": {"type": "Exact", "value": f"/{server.name}/mcp"}}],
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": url.path or "/"}},
                    }
                ],
                "backendRefs": [backend],
                # No request timeout: MCP GET streams and SSE responses stay open.
                "timeouts": {"request": "0s"},
            }
        ],
    }
    if exposure.hostnames:
        spec["hostnames"] = list(exposure.hostnames)
    raw = view.raw[("MCPServer", server.name)]
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": object_meta(route_name(server), view.namespace, [owner_ref(raw)], f"MCPServer.{server.name}"),
        "spec": spec,
    }, None


def extension_policy(view: NamespaceView, servers: list[MCPServer], settings: ControllerSettings) -> dict[str, Any]:
    """One EnvoyExtensionPolicy attaching the shared extension server to every exposed route."""
    owners = [owner_ref(view.raw[("MCPServer", s.name)], controller=False) for s in servers]
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyExtensionPolicy",
        "metadata": object_meta(EXTPROC_NAME, view.namespace, owners, "namespace"),
        "spec": {
            "targetRefs": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": route_name(s)} for s in servers],
            "extProc": [
                {
                    "backendRefs": [{"group": "", "kind": "Service", "name": EXTPROC_NAME, "port": settings.grpc_port}],
                    "processingMode": {
                        "request": {"body": "Buffered"},
                        "response": {},
                        "allowModeOverride": True,
                    },
                    "messageTimeout": "2s",
                    "failOpen": False,
                    # The Service's replicas are endpoints of one cluster; one whose connection
                    # fails (killed, its node gone) is ejected at once, before its readiness
                    # probe takes it out of the Service (as `render envoy` does with replicas).
                    "backendSettings": {
                        "healthCheck": {
                            "passive": {
                                "splitExternalLocalOriginErrors": True,
                                "consecutiveLocalOriginFailures": 1,
                                "interval": "1s",
                                "baseEjectionTime": "5s",
                                "maxEjectionPercent": 50,
                            }
                        }
                    },
                }
            ],
        },
    }
