"""The controller's only door to the API server: a thin layer over the official ``kubernetes`` client.

Data flow::

    Kube.list / get / apply (server-side apply, field manager, force) / delete / patch_status
        ──ApiClient.param_serialize + call_api (auth, TLS, kubeconfig or in-cluster config)──▶ API server
    Kube.watch ──kubernetes.watch.Watch over CustomObjectsApi──▶ (type, object) events
    ApiException ──▶ KubeError(status, reason)   (the one exception the loop handles)

Objects are plain dicts, as the renderers produce them; the kind table says
where each kind lives in the REST API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from controller.render.meta import MANAGER
from extproc.errors import ExtProcError


class KubeError(ExtProcError):
    """An API call failed; ``status`` is the HTTP status (0 when no answer arrived)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KindInfo:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        """``/api/v1/namespaces/ns/configmaps/name`` and the like."""
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub is not None:
            base += f"/{sub}"
        return base


_KINDS: Final = [
    KindInfo("v1", "ConfigMap", "configmaps"),
    KindInfo("v1", "Secret", "secrets"),
    KindInfo("v1", "Service", "services"),
    KindInfo("v1", "Pod", "pods"),
    KindInfo("apps/v1", "Deployment", "deployments"),
    KindInfo("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    KindInfo("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
    KindInfo("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy", "envoyextensionpolicies"),
    KindInfo("networking.istio.io/v1alpha3", "EnvoyFilter", "envoyfilters"),
    KindInfo("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", False),
    KindInfo("coordination.k8s.io/v1", "Lease", "leases"),
    KindInfo("mcp.extproc.io/v1alpha1", "MCPServer", "mcpservers"),
    KindInfo("mcp.extproc.io/v1alpha1", "MCPToolPolicy", "mcptoolpolicies"),
    KindInfo("mcp.extproc.io/v1alpha1", "MCPAgent", "mcpagents"),
    KindInfo("mcp.extproc.io/v1alpha1", "MCPVirtualServer", "mcpvirtualservers"),
    KindInfo("mcp.extproc.io/v1alpha1", "MCPAccessGrant", "mcpaccessgrants"),
    KindInfo("mcp.extproc.io/v1alpha1", "MCPConsent", "mcpconsents"),
]
KINDS: Final = {k.kind: k for k in _KINDS}
RENDERED_KINDS: Final = (
    "ConfigMap",
    "Secret",
    "Service",
    "Deployment",
    "NetworkPolicy",
    "HTTPRoute",
    "EnvoyExtensionPolicy",
    "EnvoyFilter",
)
"""Kinds the renderers produce in namespaces (listed for pruning)."""


def load_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An API client from ``kubeconfig``, else in-cluster config, else ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise KubeError(f"no Kubernetes configuration: {exc}") from None
    return client.ApiClient(configuration)


class Kube:
    """Plain-dict access to the kinds the controller reads and writes."""

    def __init__(self, api: client.ApiClient, *, timeout_s: float = 30.0) -> None:
        self.api = api
        self.timeout_s = timeout_s
        self.custom = client.CustomObjectsApi(api)

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*request, _request_timeout=self.timeout_s)
            data = response.read()
        except ApiException as exc:  # transport errors are wrapped by the client as well
            raise KubeError(f"{method} {path}: {exc.status} {exc.reason}", exc.status or 0) from None
        except OSError as exc:
            raise KubeError(f"{method} {path}: {exc}") from None
        if not 200 <= response.status <= 299:
            reason = ""
            try:
                reason = json.loads(data).get("message", "")
            except (ValueError, AttributeError):
                reason = data[:200].decode("utf-8", "replace") if data else ""
            raise KubeError(f"{method} {path}: {response.status} {reason}".rstrip(), response.status)
        return json.loads(data) if data else None

    def list(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict[str, Any]]:
        """Every object of ``kind`` (in ``namespace``, or all namespaces)."""
        query = [("labelSelector", label_selector)] if label_selector else []
        found = self._call("GET", KINDS[kind].path(namespace), query=query)
        items: list[dict[str, Any]] = found.get("items", [])
        info = KINDS[kind]
        for item in items:  # list responses leave these out of the items
            item.setdefault("apiVersion", info.api_version)
            item.setdefault("kind", info.kind)
        return items

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        try:
            found: dict[str, Any] = self._call("GET", KINDS[kind].path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` with the controller's field manager (conflicts forced)."""
        info = KINDS[obj["kind"]]
        meta = obj["metadata"]
        path = info.path(meta.get("namespace"), meta["name"])
        query = [("fieldManager", MANAGER), ("force", "true")]
        applied: dict[str, Any] = self._call(
            "PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml"
        )
        return applied

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        """Delete one object (background propagation); a missing object is not an error."""
        try:
            self._call("DELETE", KINDS[kind].path(namespace, name), body={"propagationPolicy": "Background"})
        except KubeError as exc:
            if exc.status != 404:
                raise

    def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        """Write ``status`` through the status subresource (a merge patch)."""
        meta = obj["metadata"]
        path = KINDS[obj["kind"]].path(meta["namespace"], meta["name"], "status")
        self._call("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (``KubeError`` 409 when it exists)."""
        created: dict[str, Any] = self._call(
            "POST", KINDS[obj["kind"]].path(obj["metadata"].get("namespace")), body=obj
        )
        return created

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace ``obj`` (optimistic: 409 when its ``resourceVersion`` is stale)."""
        meta = obj["metadata"]
        replaced: dict[str, Any] = self._call(
            "PUT", KINDS[obj["kind"]].path(meta.get("namespace"), meta["name"]), body=obj
        )
        return replaced

    def watch(self, kind: str, timeout_s: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch a custom kind in every namespace for up to ``timeout_s`` (then the stream ends)."""
        group, version = KINDS[kind].api_version.split("/")
        stream = watch.Watch().stream(
            self.custom.list_cluster_custom_object,
            group,
            version,
            KINDS[kind].plural,
            timeout_seconds=timeout_s,
            _request_timeout=timeout_s + 5,
        )
        try:
            for event in stream:
                yield str(event["type"]), dict(event["object"])
        except ApiException as exc:
            raise KubeError(f"watch {kind}: {exc.status} {exc.reason}", exc.status or 0) from None
        except OSError as exc:
            raise KubeError(f"watch {kind}: {exc}") from None
