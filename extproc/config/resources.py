"""Resource documents: the YAML loader and the :class:`Catalog` (models in :mod:`extproc.config.models`).

The same documents drive ``mcp-extproc up`` on a laptop and the controller in a
cluster. Locally they sit in one multi-document YAML file::

    file ──strict_yaml.load_all (a key written twice is refused)──▶ documents
         ──validate(kind)──▶ Catalog{servers, policies, agents, secrets, config maps}
         ──▶ reference_problems (refused locally)

Every error names the file, the document's position, its kind and name, and the
field that was wrong, e.g. ``resources.yaml: document 2 (MCPServer "demo"):
spec.url: must be an http:// or https:// URL``, or for a key written twice
``resources.yaml: document 1 (MCPServer 'demo'): line 8, column 3: spec.deniedTools:
the key 'deniedTools' is repeated (first at line 7, column 3); …``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from extproc.config import strict_yaml
from extproc.config.models import (
    API_VERSION,
    KINDS,
    ConfigMap,
    KeyRef,
    MCPAccessGrant,
    MCPAgent,
    MCPConsent,
    MCPServer,
    MCPServerSpec,
    MCPToolPolicy,
    MCPVirtualServer,
    Model,
    ObjectMeta,
    Resource,
    Secret,
    ServerRef,
)
from extproc.errors import ConfigError

__all__ = [
    "API_VERSION",
    "Catalog",
    "ConfigMap",
    "MCPAccessGrant",
    "MCPAgent",
    "MCPConsent",
    "MCPServer",
    "MCPServerSpec",
    "MCPToolPolicy",
    "MCPVirtualServer",
    "ObjectMeta",
    "Secret",
    "load_resources",
    "load_text",
    "parse_documents",
    "reference_problems",
]


@dataclass(frozen=True)
class Catalog:
    """Every resource loaded, by kind and name."""

    servers: Mapping[str, MCPServer] = field(default_factory=dict)
    policies: Mapping[str, MCPToolPolicy] = field(default_factory=dict)
    agents: Mapping[str, MCPAgent] = field(default_factory=dict)
    secrets: Mapping[str, Secret] = field(default_factory=dict, repr=False)
    config_maps: Mapping[str, ConfigMap] = field(default_factory=dict)
    virtual_servers: Mapping[str, MCPVirtualServer] = field(default_factory=dict)
    grants: Mapping[str, MCPAccessGrant] = field(default_factory=dict)
    consents: Mapping[str, MCPConsent] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    generation: int = 0
    """Bumped on every successful reload, so caches keyed by it never outlive a change."""

    @classmethod
    def of_kinds(cls, found: Mapping[type[Resource], Mapping[str, Any]], sources: tuple[str, ...]) -> Catalog:
        """The catalog of validated resources by model (as :data:`KINDS` names them) and name."""
        return cls(
            servers=found[MCPServer],
            policies=found[MCPToolPolicy],
            agents=found[MCPAgent],
            secrets=found[Secret],
            config_maps=found[ConfigMap],
            virtual_servers=found[MCPVirtualServer],
            grants=found[MCPAccessGrant],
            consents=found[MCPConsent],
            sources=sources,
        )

    def server_for_path(self, path: str) -> MCPServer | None:
        """The server whose agent-facing prefix ``/<name>/`` starts ``path``."""
        parts = path.split("/", 2)
        if len(parts) < 2:
            return None
        return self.servers.get(parts[1])

    def virtual_for_path(self, path: str) -> MCPVirtualServer | None:
        """The virtual server whose agent-facing prefix ``/<name>/`` starts ``path``."""
        parts = path.split("/", 2)
        return self.virtual_servers.get(parts[1]) if len(parts) >= 2 else None

    def policies_for(self, server: str) -> list[MCPToolPolicy]:
        """The policies targeting ``server``, in name order."""
        return [p for _, p in sorted(self.policies.items()) if any(t.name == server for t in p.spec.target_refs)]

    def grants_for(self, server: str, virtual: str | None = None) -> list[MCPAccessGrant]:
        """The grants (enabled or not) for ``server``, or for the virtual server a call came through, in name order."""
        return [g for _, g in sorted(self.grants.items()) if g.targets(server, virtual)]

    def consents_for(self, server: str, virtual: str | None = None) -> list[MCPConsent]:
        """The consents covering ``server`` or the virtual server a call came through, in name order."""
        return [c for _, c in sorted(self.consents.items()) if c.targets(server, virtual)]

    def lone_agent_without_identity(self) -> MCPAgent | None:
        """The only ``MCPAgent``, when it declares no ``spec.identity``: what ``up`` serves as the
        workload (every caller without a token is it); ``None`` with several agents or an identity."""
        if len(self.agents) != 1:
            return None
        [agent] = self.agents.values()
        return agent if agent.spec.identity is None else None

    def agents_for(self, server: str) -> list[MCPAgent]:
        """The agents that reference ``server``, in name order."""
        return [a for _, a in sorted(self.agents.items()) if any(r.name == server for r in a.spec.mcp_server_refs)]

    def subset(
        self, servers: Iterable[str], *, agents: Iterable[MCPAgent] = (), sources: tuple[str, ...] = ()
    ) -> Catalog:
        """Only ``servers`` (names, in order; unknown ones skipped) and what they need.

        The result holds:

        * the policies targeting a kept server, each trimmed to its kept targets (those
          referenced by ``agents`` first, in their reference order, then the rest in
          catalog order);
        * ``agents`` using at least one kept server, their ``mcpServerRefs`` and
          ``policyRefs`` trimmed to what is kept;
        * the ConfigMaps the kept policies' Rego references and the Secrets the kept
          servers' upstream auth references (any other Secret stays out);
        * the grants and consents of a kept server or virtual server (grants trimmed
          to their kept targets);
        * ``sources`` as given, and generation 0.
        """
        servers = list(servers)
        virtual = {n: self.virtual_servers[n] for n in servers if n in self.virtual_servers}
        backends = [b.name for v in virtual.values() for b in v.spec.servers]
        kept = {name: self.servers[name] for name in [*servers, *backends] if name in self.servers}
        agents = list(agents)
        chosen = {r.name: self.policies[r.name] for a in agents for r in a.spec.policy_refs if r.name in self.policies}
        chosen.update((n, p) for n, p in self.policies.items() if n not in chosen)
        policies = {}
        for name, policy in chosen.items():
            targets = [t for t in policy.spec.target_refs if t.name in kept]
            if targets:
                policies[name] = policy.model_copy(
                    update={"spec": policy.spec.model_copy(update={"target_refs": targets})}
                )
        trimmed_agents = {}
        for agent in agents:
            refs = [r for r in agent.spec.mcp_server_refs if r.name in kept or r.name in virtual]
            if refs:
                policy_refs = [r for r in agent.spec.policy_refs if r.name in policies]
                spec = agent.spec.model_copy(update={"mcp_server_refs": refs, "policy_refs": policy_refs})
                trimmed_agents[agent.name] = agent.model_copy(update={"spec": spec})
        maps = {
            ref.name: self.config_maps[ref.name]
            for p in policies.values()
            if p.spec.rego is not None
            and (ref := p.spec.rego.config_map_ref) is not None
            and ref.name in self.config_maps
        }
        secret_names = sorted({ref.name for s in kept.values() for _, ref in _secret_refs(s)})

        def reachable(ref: ServerRef) -> bool:
            return ref.name in (kept if ref.kind == "MCPServer" else virtual)

        grants = {}
        for name, grant in self.grants.items():
            refs = [r for r in grant.spec.target_refs if reachable(r)]
            if refs:
                grants[name] = grant.model_copy(update={"spec": grant.spec.model_copy(update={"target_refs": refs})})
        consents = {n: c for n, c in self.consents.items() if reachable(c.spec.server_ref)}
        return Catalog(
            servers=kept,
            policies=policies,
            agents=trimmed_agents,
            secrets={n: self.secrets[n] for n in secret_names if n in self.secrets},
            config_maps=maps,
            virtual_servers=virtual,
            grants=grants,
            consents=consents,
            sources=sources,
        )

    def secret_value(self, ref: KeyRef) -> str:
        """The decoded value of a Secret key.

        Raises:
            ConfigError: the Secret or key is missing, or its data is not base64 (the
                message names the Secret and key, never the value).
        """
        secret = self.secrets.get(ref.name)
        if secret is None:
            raise ConfigError(f"Secret {ref.name!r} not found; add a v1 Secret document named {ref.name!r}")
        if ref.key in secret.string_data:
            return secret.string_data[ref.key]
        if ref.key in secret.data:
            try:
                return base64.b64decode(secret.data[ref.key], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(f"Secret {ref.name!r}: data.{ref.key}: not base64-encoded UTF-8") from None
        keys = sorted({*secret.data, *secret.string_data})
        raise ConfigError(f"Secret {ref.name!r} has no key {ref.key!r}; it has {keys}")

    def config_value(self, ref: KeyRef) -> str:
        """The value of a ConfigMap key.

        Raises:
            ConfigError: the ConfigMap or key is missing.
        """
        found = self.config_maps.get(ref.name)
        if found is None:
            raise ConfigError(f"ConfigMap {ref.name!r} not found; add a v1 ConfigMap document named {ref.name!r}")
        if ref.key not in found.data:
            raise ConfigError(f"ConfigMap {ref.name!r} has no key {ref.key!r}; it has {sorted(found.data)}")
        return found.data[ref.key]


def reference_problems(catalog: Catalog) -> list[str]:
    """Every reference that does not resolve, as ``<Kind> "<name>": <field>: <problem>``.

    The local loader refuses a file with any; the controller reports them in status.
    """
    problems: list[str] = []
    for name, policy in sorted(catalog.policies.items()):
        for i, target in enumerate(policy.spec.target_refs):
            if target.name not in catalog.servers:
                problems.append(f"MCPToolPolicy {name!r}: spec.targetRefs[{i}]: no MCPServer named {target.name!r}")
        rego = policy.spec.rego
        if rego is not None and rego.config_map_ref is not None:
            try:
                catalog.config_value(rego.config_map_ref)
            except ConfigError as exc:
                problems.append(f"MCPToolPolicy {name!r}: spec.rego.configMapRef: {exc}")
    for name, agent in sorted(catalog.agents.items()):
        for i, ref in enumerate(agent.spec.mcp_server_refs):
            problems += _server_ref_problem(catalog, f"MCPAgent {name!r}: spec.mcpServerRefs[{i}]", ref)
        for i, policy_ref in enumerate(agent.spec.policy_refs):
            if policy_ref.name not in catalog.policies:
                problems.append(f"MCPAgent {name!r}: spec.policyRefs[{i}]: no MCPToolPolicy named {policy_ref.name!r}")
    for name, virtual in sorted(catalog.virtual_servers.items()):
        if name in catalog.servers:
            problems.append(
                f"MCPVirtualServer {name!r}: metadata.name: an MCPServer has this name; "
                f"both would be served at /{name}/mcp, so pick another"
            )
        for i, backend in enumerate(virtual.spec.servers):
            if backend.name not in catalog.servers:
                problems.append(
                    f"MCPVirtualServer {name!r}: spec.servers[{i}].name: no MCPServer named {backend.name!r}"
                )
    for name, grant in sorted(catalog.grants.items()):
        for i, ref in enumerate(grant.spec.target_refs):
            problems += _server_ref_problem(catalog, f"MCPAccessGrant {name!r}: spec.targetRefs[{i}]", ref)
    for name, consent in sorted(catalog.consents.items()):
        problems += _server_ref_problem(catalog, f"MCPConsent {name!r}: spec.serverRef", consent.spec.server_ref)
    for name, server in sorted(catalog.servers.items()):
        for where, key_ref in _secret_refs(server):
            try:
                catalog.secret_value(key_ref)
            except ConfigError as exc:
                problems.append(f"MCPServer {name!r}: {where}: {exc}")
    return problems


def _server_ref_problem(catalog: Catalog, where: str, ref: ServerRef) -> list[str]:
    known = catalog.servers if ref.kind == "MCPServer" else catalog.virtual_servers
    return [] if ref.name in known else [f"{where}: no {ref.kind} named {ref.name!r}"]


def _secret_refs(server: MCPServer) -> list[tuple[str, KeyRef]]:
    """The Secret keys ``server``'s upstream auth references, each with its field path."""
    auth = server.spec.upstream_auth
    if auth is None:
        return []
    refs: list[tuple[str, KeyRef]] = []
    if auth.bearer is not None and auth.bearer.secret_ref is not None:
        refs.append(("spec.upstreamAuth.bearer.secretRef", auth.bearer.secret_ref))
    if auth.client_credentials is not None:
        refs.append(("spec.upstreamAuth.clientCredentials.clientSecretRef", auth.client_credentials.client_secret_ref))
    if auth.token_exchange is not None:
        refs.append(("spec.upstreamAuth.tokenExchange.clientSecretRef", auth.token_exchange.client_secret_ref))
    return refs


def _field_path(loc: Iterable[int | str], model: type[Model]) -> str:
    """Pydantic's error location with aliases, e.g. ``spec.allowedTools[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _camel(part)
    return out or "(document)"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def parse_documents(docs: Iterable[Any], source: str) -> Catalog:
    """Validate decoded YAML documents into a :class:`Catalog`.

    Raises:
        ConfigError: naming ``source``, the document, its kind and name, and the field.
    """
    found: dict[type[Resource], dict[str, Any]] = {model: {} for model in KINDS.values()}
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{source}: document {index}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a mapping with apiVersion, kind, metadata and spec")
        kind = doc.get("kind")
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        label = f"{where} ({kind} {name!r})" if name else f"{where} ({kind})"
        api_version = doc.get("apiVersion")
        kinds_of_version = sorted(k for v, k in KINDS if v == api_version)
        if not kinds_of_version:
            raise ConfigError(
                f"{label}: apiVersion: must be {API_VERSION!r} (or 'v1' for Secret and ConfigMap), got {api_version!r}"
            )
        model = KINDS.get((str(api_version), str(kind)))
        if model is None:
            raise ConfigError(
                f"{label}: kind: must be one of {kinds_of_version} for apiVersion {api_version!r}, got {kind!r}"
            )
        try:
            resource = model.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            fields = _field_path(first["loc"], model)
            # Never echo a Secret's values back in an error.
            detail = first["msg"] if model is not Secret else first["type"]
            raise ConfigError(f"{label}: {fields}: {detail}") from None
        same_kind = found[model]
        if resource.name in same_kind:
            raise ConfigError(f"{label}: metadata.name: duplicate {kind} {resource.name!r}")
        same_kind[resource.name] = resource
    return Catalog.of_kinds(found, (source,))


def load_resources(path: str | Path) -> Catalog:
    """Load and validate a multi-document YAML file of resources.

    Raises:
        ConfigError: the file cannot be read, is not YAML, writes a mapping key twice, or a
            document is invalid.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    return load_text(text, source)


def load_text(text: str, source: str) -> Catalog:
    """:func:`load_resources` of a file's text (``source`` names it in errors).

    Raises:
        ConfigError: as :func:`load_resources`.
    """
    try:
        docs = list(strict_yaml.load_all(text))
    except strict_yaml.RepeatedKeyError as exc:
        raise ConfigError(exc.located(source, documents=True)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    catalog = parse_documents(docs, source)
    problems = reference_problems(catalog)
    if problems:
        raise ConfigError(f"{source}: " + f"\n{source}: ".join(problems))
    if not catalog.servers:
        raise ConfigError(f"{source}: no MCPServer documents; add at least one (see README, 'MCPServer')")
    return catalog
