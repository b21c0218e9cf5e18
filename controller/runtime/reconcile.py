"""Reconcile one namespace: read, render, apply, prune, write status. The I/O edge of the renderers.

Data flow::

    Kube.list(every custom kind in ns: view.CUSTOM_KINDS) + the Secrets, ConfigMaps and
    Services they name ──build_view──▶ NamespaceView ──render_namespace──▶ objects, problems
        ──rendered.session_keys──▶ ensure_session_keys: Secret mcp-extproc-session-keys
                                   created when missing, never overwritten (session_keys.py)
        ──Kube.apply (server-side apply, field manager mcp-extproc-controller)──▶ cluster
        ──Kube.list(label managed-by) minus rendered──▶ Kube.delete  (prune)
        ──reports.collect (what every extension server of the namespace observed)──▶
          observed.server_tools / virtual_backends  (the status's first-use pins were
          rendered into the sidecars' configuration above: a ConfigMap follows its
          status one pass later, the status write being a watch event)
        ──compute_status (+ an MCPConsent's Expired/Revoked at the clock's now; + an
          MCPServer's tools[], an MCPVirtualServer's backends[])──▶
          Kube.patch_status (only when it changed)
        ──▶ seconds until the namespace's next consent expiry, or until its extension
            servers are asked again (``report_interval_s``): the loop comes back then

A transient API error (no answer, 429, 5xx) is raised for the loop to retry with
backoff; any other error applying an object is written into its owner's status
(``Ready=False, reason ApplyFailed``) and the rest carries on.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterator
from typing import Any

from controller.render.meta import MANAGED_BY, MANAGER, ControllerSettings
from controller.render.namespace import render_namespace
from controller.render.netpol import service_host
from controller.render.observed import Report, server_tools, virtual_backends
from controller.render.status import Condition, compute_status, consent_conditions, next_expiry, rfc3339, same_status
from controller.render.view import CUSTOM_KINDS, Key, build_view
from controller.runtime.kube import RENDERED_KINDS, Kube, KubeError
from controller.runtime.reports import collect
from controller.runtime.session_keys import ensure_session_keys
from extproc.config.resources import Catalog

log = logging.getLogger("mcp_extproc.controller")


def transient(exc: KubeError) -> bool:
    """Worth retrying: no answer, throttled, or a server-side failure."""
    return exc.status == 0 or exc.status == 429 or exc.status >= 500


def _walk_refs(node: Any, key: str) -> Iterator[str]:
    """Names of every ``key: {name: ...}`` reference anywhere under ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, dict) and isinstance(v.get("name"), str):
                yield v["name"]
            else:
                yield from _walk_refs(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_refs(item, key)


def utc_now() -> datetime.datetime:
    """The wall clock, aware, in UTC (the reconciler's default clock)."""
    return datetime.datetime.now(datetime.UTC)


class Reconciler:
    """Brings one namespace in line with its custom resources.

    ``clock`` gives the aware time a pass judges consents' ``expiresAt`` by and writes as
    ``lastTransitionTime`` (tests pass a fake one). ``report_interval_s``: how often, at
    most, a namespace's extension servers are asked what they observed; ``None`` never
    asks (the status then has no ``tools[]`` or ``backends[]``).
    """

    def __init__(
        self,
        kube: Kube,
        settings: ControllerSettings,
        clock: Callable[[], datetime.datetime] = utc_now,
        report_interval_s: float | None = 30.0,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.report_interval_s = report_interval_s

    def namespaces(self) -> set[str]:
        """Every namespace holding a custom resource or something the controller rendered."""
        found = {str(o["metadata"]["namespace"]) for kind in CUSTOM_KINDS for o in self.kube.list(kind)}
        for obj in self.kube.list("ConfigMap", label_selector=f"{MANAGED_BY}={MANAGER}"):
            found.add(str(obj["metadata"]["namespace"]))
        return found

    def _read(self, namespace: str) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
        custom = [o for kind in CUSTOM_KINDS for o in self.kube.list(kind, namespace)]
        extra: list[dict[str, Any]] = []
        for kind, ref_keys in (("Secret", ("secretRef", "clientSecretRef")), ("ConfigMap", ("configMapRef",))):
            names = sorted({n for o in custom for k in ref_keys for n in _walk_refs(o.get("spec"), k)})
            for name in names:
                found = self.kube.get(kind, name, namespace)
                if found is not None:
                    extra.append({**found, "apiVersion": "v1", "kind": kind})
        services: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in custom:
            url = str((obj.get("spec") or {}).get("url", "")) if obj["kind"] == "MCPServer" else ""
            host = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1].split(":", 1)[0]
            svc = service_host(host) if url else None
            if svc is not None and (svc.namespace, svc.name) not in services:
                found = self.kube.get("Service", svc.name, svc.namespace)
                if found is not None:
                    services[(svc.namespace, svc.name)] = found
        return custom + extra, services

    def reconcile(self, namespace: str) -> float | None:
        """One pass over ``namespace``.

        Returns:
            Seconds until the earliest ``expiresAt`` of the namespace's consents still to
            come, or until its extension servers are to be asked again, whichever is first
            (``None`` without either): neither is announced by a watch event. The loop
            reconciles the namespace again at that moment (:class:`controller.runtime.loop.Controller`).

        Raises:
            KubeError: a transient API error; nothing is assumed about what was written.
        """
        objects, services = self._read(namespace)
        view = build_view(namespace, objects, services)
        rendered = render_namespace(view, self.settings)
        if rendered.session_keys:
            self._session_keys(namespace)
        apply_errors: dict[Key, str] = {}
        wanted: set[tuple[str, str]] = set()
        for obj in rendered.objects:
            wanted.add((obj["kind"], obj["metadata"]["name"]))
            try:
                self.kube.apply(obj)
            except KubeError as exc:
                if transient(exc):
                    raise
                for owner in obj["metadata"].get("ownerReferences", []):
                    apply_errors.setdefault((owner["kind"], owner["name"]), str(exc))
                log.warning("apply %s %s/%s failed: %s", obj["kind"], namespace, obj["metadata"]["name"], exc)
        self._prune(namespace, wanted)
        asks = self.report_interval_s is not None and bool(view.catalog.servers or view.catalog.virtual_servers)
        reports = self._reports(namespace) if asks else []
        moment = self.clock()
        now = rfc3339(moment)
        for key, raw in sorted(view.raw.items()):
            extra: list[Condition] = []
            consent = view.catalog.consents.get(key[1]) if key[0] == "MCPConsent" else None
            if consent is not None:
                extra = consent_conditions(consent, moment)
            status = compute_status(
                raw,
                invalid=view.invalid.get(key),
                problems=rendered.problems.get(key, []),
                apply_error=apply_errors.get(key),
                previous=raw.get("status"),
                extra=extra,
                now=now,
            )
            if asks:
                status.update(self._observed(view.catalog, key, raw, reports, now))
            if not same_status(raw.get("status"), status):
                try:
                    self.kube.patch_status(raw, status)
                except KubeError as exc:
                    if transient(exc) or exc.status != 404:  # 404: deleted meanwhile
                        raise
        lapse = next_expiry(view.catalog.consents.values(), moment)
        waits = [(lapse - moment).total_seconds()] if lapse is not None else []
        if asks and self.report_interval_s is not None:
            waits.append(self.report_interval_s)
        return min(waits, default=None)

    def _reports(self, namespace: str) -> list[Report]:
        """What the namespace's extension servers observed; none when pods cannot be listed
        (RBAC, an API error): the status keeps what it said."""
        try:
            return collect(self.kube, namespace, self.settings)
        except KubeError as exc:
            log.warning("cannot ask the extension servers in %s what they observed: %s", namespace, exc)
            return []

    @staticmethod
    def _observed(catalog: Catalog, key: Key, raw: dict[str, Any], reports: list[Report], now: str) -> dict[str, Any]:
        """The status fields that come from the reports: an MCPServer's tools[], an MCPVirtualServer's backends[]."""
        kind, name = key
        previous = raw.get("status")
        if kind == "MCPServer" and name in catalog.servers:
            declared = (raw.get("spec") or {}).get("pinnedTools") or {}
            # toolPinning Off: none, and a list written before is deleted (null, in a merge patch).
            return {"tools": server_tools(catalog.servers[name], declared, previous, reports, now)}
        if kind == "MCPVirtualServer" and name in catalog.virtual_servers:
            return {"backends": virtual_backends(catalog.virtual_servers[name], previous, reports)}
        return {}

    def _session_keys(self, namespace: str) -> None:
        """The session key Secret the namespace's extension servers mount: created when missing."""
        try:
            ensure_session_keys(self.kube, namespace)
        except KubeError as exc:
            if transient(exc):
                raise
            log.warning("cannot create the session key Secret in %s (its pods wait for it): %s", namespace, exc)

    def _prune(self, namespace: str, wanted: set[tuple[str, str]]) -> None:
        for kind in RENDERED_KINDS:
            try:
                existing = self.kube.list(kind, namespace, label_selector=f"{MANAGED_BY}={MANAGER}")
            except KubeError as exc:
                if exc.status == 404:  # that API (e.g. Gateway API, Istio) is not installed
                    continue
                raise
            for obj in existing:
                name = obj["metadata"]["name"]
                if (kind, name) not in wanted:
                    log.info("prune %s %s/%s", kind, namespace, name)
                    self.kube.delete(kind, name, namespace)
