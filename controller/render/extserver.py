"""The shared extension server of a namespace (Gateway and Istio modes). Pure.

Data flow::

    the namespace's MCPServers used by a Gateway or an Istio agent (+ their policies,
    grants and consents)
        ──▶ ConfigMap mcp-extproc  (resources.yaml, pipeline.yaml; resources.yaml in
                                    Secret mcp-extproc instead when it holds Secrets)
        ──▶ Deployment mcp-extproc (``mcp-extproc serve --grpc 0.0.0.0:<port>``, 2 replicas spread
                                    over nodes, every one mounting the namespace's session
                                    key Secret: any replica serves any session)
        ──▶ Service mcp-extproc    (gRPC, the EnvoyExtensionPolicy / EnvoyFilter target: the
                                    proxies balance streams over its ready endpoints)

Owned by every MCPServer it serves: it goes away with the last of them.
"""

from __future__ import annotations

from typing import Any

import yaml

from controller.render import session_keys
from controller.render.meta import EXTPROC_NAME, ControllerSettings, object_meta, owner_ref
from controller.render.sidecar import CONFIG_DIR, documents, dump_documents, serve_args
from controller.render.view import NamespaceView
from extproc.config.models import MCPServer
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig
from extproc.config.resources import Catalog

APP_LABEL = "app.kubernetes.io/name"


def shared_catalog(view: NamespaceView, servers: list[MCPServer]) -> Catalog:
    """The servers, the policies, grants and consents targeting them, and what those reference."""
    return view.catalog.subset(s.name for s in servers)


def extension_server(
    view: NamespaceView,
    servers: list[MCPServer],
    settings: ControllerSettings,
    pipeline: PipelineConfig = DEFAULT_PIPELINE,
) -> list[dict[str, Any]]:
    """ConfigMap (and Secret), Deployment and Service of the namespace's shared extension server."""
    if not servers:
        return []
    catalog = shared_catalog(view, servers)
    owners = [owner_ref(view.raw[("MCPServer", s.name)], controller=False) for s in servers]
    labels = {APP_LABEL: EXTPROC_NAME}

    def meta() -> dict[str, Any]:
        return object_meta(EXTPROC_NAME, view.namespace, owners, "namespace", **labels)

    resources = dump_documents(documents(catalog))
    data = {"pipeline.yaml": yaml.safe_dump(pipeline.model_dump(mode="json", by_alias=True), sort_keys=False)}
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(), "data": data}]
    sources: list[dict[str, Any]] = [{"configMap": {"name": EXTPROC_NAME}}]
    if catalog.secrets:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": meta(),
                "type": "Opaque",
                "stringData": {"resources.yaml": resources},
            }
        )
        sources.append({"secret": {"name": EXTPROC_NAME}})
    else:
        data["resources.yaml"] = resources
    container = {
        "name": "extproc",
        "image": settings.image,
        "args": serve_args(
            "--grpc",
            f"0.0.0.0:{settings.grpc_port}",
            "--metrics",
            "0.0.0.0:9464",
            "--report",
            f"0.0.0.0:{settings.report_port}",
            *session_keys.args(settings),
        ),
        "ports": [
            {"name": "grpc", "containerPort": settings.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
            {"name": "report", "containerPort": settings.report_port, "protocol": "TCP"},
        ],
        "readinessProbe": {"grpc": {"port": settings.grpc_port}},
        "livenessProbe": {"grpc": {"port": settings.grpc_port}, "periodSeconds": 20},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.extproc_uid,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            session_keys.mount(settings),
        ],
    }
    objects.append(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(),
            "spec": {
                "replicas": settings.shared_replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        # One replica per node where the cluster allows: losing a node leaves one serving.
                        "topologySpreadConstraints": [
                            {
                                "maxSkew": 1,
                                "topologyKey": "kubernetes.io/hostname",
                                "whenUnsatisfiable": "ScheduleAnyway",
                                "labelSelector": {"matchLabels": labels},
                            }
                        ],
                        "automountServiceAccountToken": False,
                        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [container],
                        "volumes": [{"name": "config", "projected": {"sources": sources}}, session_keys.volume()],
                    },
                },
            },
        }
    )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(),
            "spec": {
                "selector": labels,
                "ports": [
                    {
                        "name": "grpc",
                        "port": settings.grpc_port,
                        "targetPort": "grpc",
                        "protocol": "TCP",
                        "appProtocol": "kubernetes.io/h2c",
                    }
                ],
            },
        }
    )
    return objects
