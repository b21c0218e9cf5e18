"""One namespace's resources as the renderers see them. Pure.

Data flow::

    raw objects (from the API server, or a file) ──strip server fields──▶ model_validate
        ├─ valid   ──▶ Catalog (the same type `mcp-extproc up` uses)
        └─ invalid ──▶ problems[(kind, name)]   (status: Accepted=False; never a crash)
    Catalog ──reference_problems──▶ problems per resource (status: ResolvedRefs=False)
    an MCPServer's status.tools[] pins taken on first use ──▶ added to its spec.pinnedTools
        (the spec's own win), so every extension server starts from the namespace's pins
        (controller.render.observed)

The cluster adds fields the local models refuse (``uid``, ``generation``,
``managedFields``, ``status``...); they are kept in ``raw`` for owner references
and ``observedGeneration``, and stripped before validation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from controller.render.observed import first_use_pins
from extproc.config.models import API_VERSION, KINDS, MCPServer, Resource, Secret, ToolPinning
from extproc.config.resources import Catalog, reference_problems

Key = tuple[str, str]
"""(kind, name) of a resource in one namespace."""

CUSTOM_KINDS = ("MCPServer", "MCPToolPolicy", "MCPAgent", "MCPVirtualServer", "MCPAccessGrant", "MCPConsent")
_META_KEPT = ("name", "namespace", "labels", "annotations")


@dataclass(frozen=True)
class NamespaceView:
    """The valid resources of one namespace, their raw objects, and what is wrong with the rest.

    Attributes:
        namespace: the namespace.
        catalog: every valid resource (Secrets and ConfigMaps included).
        raw: every custom resource as read, by (kind, name).
        invalid: validation errors of custom resources that are not in ``catalog``.
        unresolved: reference problems of valid custom resources.
        services: ``v1`` Services the renderers may consult, by (namespace, name).
    """

    namespace: str
    catalog: Catalog
    raw: Mapping[Key, dict[str, Any]]
    invalid: Mapping[Key, str] = field(default_factory=dict)
    unresolved: Mapping[Key, list[str]] = field(default_factory=dict)
    services: Mapping[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def as_document(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` without the fields the API server adds (status, uid, managedFields...)."""
    meta = obj.get("metadata") or {}
    doc = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    doc["metadata"] = {k: meta[k] for k in _META_KEPT if k in meta and meta[k] is not None}
    return doc


def _error_text(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else ("." if where else "") + str(part)
    return f"{where or '(document)'}: {first['msg']}"


def _with_status_pins(resource: Any, status: Mapping[str, Any] | None) -> Any:
    """An ``MCPServer`` whose extension servers start from the pins its status took on first use
    (``spec.pinnedTools`` wins; :func:`controller.render.observed.first_use_pins`)."""
    if not isinstance(resource, MCPServer) or resource.spec.tool_pinning is ToolPinning.OFF:
        return resource
    pins = first_use_pins(status)
    if not pins:
        return resource
    spec = resource.spec.model_copy(update={"pinned_tools": {**pins, **resource.spec.pinned_tools}})
    return resource.model_copy(update={"spec": spec})


def build_view(
    namespace: str,
    objects: Iterable[Mapping[str, Any]],
    services: Mapping[tuple[str, str], dict[str, Any]] | None = None,
) -> NamespaceView:
    """Validate ``objects`` (custom resources, Secrets, ConfigMaps) of ``namespace`` into a view."""
    found: dict[type[Resource], dict[str, Any]] = {model: {} for model in KINDS.values()}
    raw: dict[Key, dict[str, Any]] = {}
    invalid: dict[Key, str] = {}
    for obj in objects:
        kind = str(obj.get("kind"))
        name = str((obj.get("metadata") or {}).get("name"))
        model = KINDS.get((str(obj.get("apiVersion")), kind))
        if model is None:
            continue
        if kind in CUSTOM_KINDS:
            raw[(kind, name)] = dict(obj)
        doc = as_document(obj)
        doc["metadata"]["namespace"] = namespace
        try:
            found[model][name] = _with_status_pins(model.model_validate(doc), obj.get("status"))
        except ValidationError as exc:
            if kind in CUSTOM_KINDS:
                invalid[(kind, name)] = _error_text(exc) if model is not Secret else "invalid Secret"
    catalog = Catalog.of_kinds(found, (f"namespace {namespace}",))
    unresolved: dict[Key, list[str]] = {}
    for problem in reference_problems(catalog):
        kind, _, rest = problem.partition(" ")
        name = rest.split(":", 1)[0].strip("'\"")
        unresolved.setdefault((kind, name), []).append(problem.split(": ", 1)[1])
    return NamespaceView(namespace, catalog, raw, invalid, unresolved, dict(services or {}))


def group_by_namespace(documents: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Documents of a resource file by ``metadata.namespace`` (``default`` when absent)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for doc in documents:
        if not isinstance(doc, Mapping):
            continue
        meta = doc.get("metadata") or {}
        out.setdefault(str(meta.get("namespace") or "default"), []).append(doc)
    return out


__all__ = ["API_VERSION", "CUSTOM_KINDS", "Key", "NamespaceView", "as_document", "build_view", "group_by_namespace"]
