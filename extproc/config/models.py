"""The resource models (``apiVersion: mcp.extproc.io/v1alpha1``), one source of truth.

The server validates resource files with these models, and the controller
generates its CRD schemas from them. Field names are the Python names;
aliases are the camelCase names users write.

Kinds::

    MCPServer      an upstream MCP server: url, tool globs, allowed agents,
                   upstream credential, forwarded headers, keepalive, production mode
    MCPToolPolicy  rules over the tools of target servers: allow/deny globs,
                   required trust and scopes, rate limit, Rego
    MCPAgent       a workload: pod selector, servers it may use, optional identity
                   (inbound JWT, mTLS service account), granted trust
    MCPVirtualServer  one endpoint over several MCPServers, each with an optional,
                   immutable tool prefix (:mod:`plugins.virtual` serves it)
    MCPAccessGrant a subject's (user, agent, group) trust ceiling, side effects and
                   tool rules on servers (:mod:`plugins.lib.grants` decides with it)
    MCPConsent     the trust a user consented to for an agent on a server, with an
                   expiry and a revocation switch
    Secret         core ``v1`` Secret (``data`` base64, ``stringData`` plain)
    ConfigMap      core ``v1`` ConfigMap (Rego modules)
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from extproc.mcp.headers import DERIVED_HEADERS

API_VERSION = "mcp.extproc.io/v1alpha1"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Model(BaseModel):
    """Base of every resource model: frozen, unknown keys are errors, camelCase aliases."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def first_problem(exc: ValidationError, empty: str = "(document)") -> str:
    """``field.path: message`` of the first error pydantic found (``empty`` names a top-level one)."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or empty}: {first['msg']}"


def http_url(value: str) -> str:
    """Check that ``value`` is an http(s) URL with a host and a well-formed port."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"has a malformed port: {value!r}") from exc
    return value


HttpUrl = Annotated[str, AfterValidator(http_url)]
"""A string that must be an http(s) URL with a host."""


class ObjectMeta(Model):
    """The parts of Kubernetes ``metadata`` we read; labels and annotations are kept."""

    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must be a DNS-1123 label: lower-case letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return value


class LocalRef(Model):
    """A reference to another resource by name (same namespace)."""

    name: str


class ServerRef(Model):
    """An agent's reference to a server it may use: an ``MCPServer`` or an ``MCPVirtualServer``."""

    kind: Literal["MCPServer", "MCPVirtualServer"] = "MCPServer"
    name: str


class KeyRef(Model):
    """A key of a ``v1`` Secret or ConfigMap (same namespace)."""

    name: str
    key: str


class LabelSelectorRequirement(Model):
    """One ``matchExpressions`` entry of a Kubernetes label selector."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(Model):
    """A Kubernetes label selector."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, alias="matchExpressions")


# --- MCPServer -----------------------------------------------------------------------------


class BearerAuth(Model):
    """A static upstream bearer token; exactly one source."""

    secret_ref: KeyRef | None = Field(default=None, alias="secretRef")
    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [n for n in ("secret_ref", "env", "file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of secretRef, env or file")
        return self


class ClientCredentials(Model):
    """OAuth 2.1 client credentials grant against ``tokenUrl``."""

    token_url: HttpUrl = Field(alias="tokenUrl")
    client_id: str = Field(alias="clientId")
    client_secret_ref: KeyRef = Field(alias="clientSecretRef")
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    resource: str | None = None
    """RFC 8707 resource indicator."""


class TokenExchange(Model):
    """RFC 8693 token exchange; the subject token is the agent's validated inbound token."""

    token_url: HttpUrl = Field(alias="tokenUrl")
    client_id: str = Field(alias="clientId")
    client_secret_ref: KeyRef = Field(alias="clientSecretRef")
    audience: str | None = None
    resource: str | None = None
    scopes: list[str] = Field(default_factory=list)


class UpstreamAuth(Model):
    """The credential injected upstream; exactly one kind."""

    bearer: BearerAuth | None = None
    client_credentials: ClientCredentials | None = Field(default=None, alias="clientCredentials")
    token_exchange: TokenExchange | None = Field(default=None, alias="tokenExchange")

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        given = [n for n in ("bearer", "client_credentials", "token_exchange") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of bearer, clientCredentials or tokenExchange")
        return self

    @property
    def is_oauth(self) -> bool:
        """True for the OAuth kinds (client credentials, token exchange)."""
        return self.client_credentials is not None or self.token_exchange is not None


class Keepalive(StrEnum):
    """Whether the session keeper answers the upstream's pings for legacy sessions."""

    AUTO = "Auto"
    ALWAYS = "Always"
    NEVER = "Never"


class GatewayParentRef(Model):
    """A Gateway API ``Gateway`` (and optionally one of its listeners) to attach a route to."""

    name: str
    namespace: str | None = None
    section_name: str | None = Field(default=None, alias="sectionName")


class GatewayExposure(Model):
    """Expose the server on a Gateway (cluster only): an ``HTTPRoute`` at ``/<name>/mcp``.

    Attributes:
        parent_refs: the Gateways the route attaches to.
        hostnames: hostnames the route answers for (empty = the listener's).
    """

    parent_refs: list[GatewayParentRef] = Field(min_length=1, alias="parentRefs")
    hostnames: list[str] = Field(default_factory=list)


HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"), AfterValidator(str.lower)]
"""An HTTP header name (an RFC 9110 token), lower-cased."""
NOT_FORWARDABLE: Final = ("authorization", *sorted(DERIVED_HEADERS))
"""Header names ``forwardHeaders`` may not list: the agent's credential and the gateway's own ``x-mcp-*``."""
_NOT_FORWARDABLE_CEL: Final = f"self.all(h, !h.matches('^(?i:{'|'.join(NOT_FORWARDABLE)})$'))"
_NOT_FORWARDABLE_WHY: Final = (
    f"{', '.join(NOT_FORWARDABLE)} cannot be forwarded: the gateway always sets or removes them"
)


class ToolPinning(StrEnum):
    """What the ``pins`` stage does with a tool definition unlike its pin."""

    OFF = "Off"
    OBSERVE = "Observe"
    ENFORCE = "Enforce"


TOOL_DIGEST_PATTERN: Final = r"^sha256:[0-9a-f]{64}$"
ToolDigest = Annotated[str, StringConstraints(pattern=TOOL_DIGEST_PATTERN)]
"""A tool definition's fingerprint, ``sha256:`` and 64 lower-case hex digits."""


class MCPServerSpec(Model):
    """An upstream MCP server reached over Streamable HTTP.

    Attributes:
        url: the server's Streamable HTTP endpoint (``http://`` or ``https://``).
        allowed_tools: globs of tools agents may call; empty allows none,
            ``["*"]`` allows all.
        denied_tools: globs of tools refused even when allowed.
        allowed_agents: pods allowed to use the server (cluster only; empty =
            the server's namespace).
        upstream_auth: the credential injected upstream (the agent's own is
            always removed).
        keepalive: whether the session keeper answers the server's pings.
        keepalive_idle_s: stop keeping a session of this server that no agent used for
            this long (default: the ``session`` stage's ``idleTimeoutSeconds``, 1800).
        production_mode: requires an https URL and an OAuth upstream credential.
        forward_headers: request headers the agent sends that the server receives, besides
            those every server does (content type, accept, the MCP headers, trace context,
            user agent, origin); all others are removed. HTTP header names, lower-cased;
            never authorization or the x-mcp-* headers the gateway sets.
        tool_pinning: ``Off``, ``Observe`` (default: a tool definition unlike its pin is
            logged and counted) or ``Enforce`` (also hidden from ``tools/list`` and refused
            until approved); the ``pins`` stage.
        pinned_tools: each tool's ``sha256:<hex>`` digest of its definition, by tool name, pinned
            up front (without any, the first definition seen is pinned: trust on first use).
    """

    url: HttpUrl
    allowed_tools: list[str] = Field(default_factory=list, alias="allowedTools")
    denied_tools: list[str] = Field(default_factory=list, alias="deniedTools")
    allowed_agents: LabelSelector | None = Field(default=None, alias="allowedAgents")
    upstream_auth: UpstreamAuth | None = Field(default=None, alias="upstreamAuth")
    keepalive: Keepalive = Keepalive.AUTO
    keepalive_idle_s: int | None = Field(default=None, gt=0, alias="keepaliveIdleSeconds")
    production_mode: bool = Field(default=False, alias="productionMode")
    forward_headers: list[HeaderName] = Field(
        default_factory=list,
        alias="forwardHeaders",
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": _NOT_FORWARDABLE_CEL, "message": _NOT_FORWARDABLE_WHY}]
        },
    )
    gateway: GatewayExposure | None = None
    """Cluster only: also expose the server on a Gateway (Envoy Gateway)."""
    tool_pinning: ToolPinning = Field(default=ToolPinning.OBSERVE, alias="toolPinning")
    pinned_tools: dict[str, ToolDigest] = Field(default_factory=dict, alias="pinnedTools")

    @field_validator("tool_pinning", mode="before")
    @classmethod
    def _off_unquoted(cls, value: object) -> object:
        return "Off" if value is False else value  # YAML 1.1 reads an unquoted Off as false

    @field_validator("allowed_tools", "denied_tools")
    @classmethod
    def _non_empty_globs(cls, value: list[str]) -> list[str]:
        for glob in value:
            if not glob.strip():
                raise ValueError("tool globs must not be empty strings")
        return value

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, value: list[str]) -> list[str]:
        for name in value:
            if name in NOT_FORWARDABLE:
                raise ValueError(f"{name!r} cannot be forwarded: the gateway always sets or removes it")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _production(self) -> Self:
        if self.production_mode:
            if urlsplit(self.url).scheme != "https":
                raise ValueError("productionMode requires an https:// url")
            if self.upstream_auth is None or not self.upstream_auth.is_oauth:
                raise ValueError("productionMode requires upstreamAuth.clientCredentials or tokenExchange")
        return self


class MCPServer(Model):
    """``kind: MCPServer``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPServer"]
    metadata: ObjectMeta
    spec: MCPServerSpec

    @property
    def name(self) -> str:
        """The server's name: agents reach it at ``/<name>/mcp``."""
        return self.metadata.name


# --- MCPToolPolicy -------------------------------------------------------------------------


class Trust(StrEnum):
    """Trust levels, ordered low < medium < high."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """0, 1, 2 for low, medium, high."""
        return _TRUST_ORDER.index(self)


_TRUST_ORDER = (Trust.LOW, Trust.MEDIUM, Trust.HIGH)


class TargetRef(Model):
    """A server a policy applies to."""

    kind: Literal["MCPServer"] = "MCPServer"
    name: str


class SideEffect(StrEnum):
    """What calling a tool may do: an ``MCPAccessGrant`` allows some of these."""

    READ = "read"
    WRITE = "write"
    DESTRUCTIVE = "destructive"


class ToolRule(Model):
    """One rule: the first rule whose globs match a tool decides for it.

    Attributes:
        tools: tool-name globs.
        action: ``Allow`` (subject to trust and scopes) or ``Deny``.
        required_trust: the least effective trust a caller needs.
        scopes: token scopes a caller needs (403 ``insufficient_scope`` otherwise).
        side_effect: what the tools do, declared (else read from their annotations);
            grants allow side effects.
    """

    tools: list[str] = Field(min_length=1)
    action: Literal["Allow", "Deny"] = "Allow"
    required_trust: Trust = Field(default=Trust.LOW, alias="requiredTrust")
    scopes: list[str] = Field(default_factory=list)
    side_effect: SideEffect | None = Field(default=None, alias="sideEffect")


class RateLimit(Model):
    """A token bucket: ``requests`` per ``perSeconds``, one bucket per key.

    ``key: principal`` keeps one bucket per caller; ``key: tool`` one per
    (caller, tool).
    """

    requests: int = Field(gt=0)
    per_seconds: float = Field(gt=0, alias="perSeconds")
    key: Literal["principal", "tool"] = "principal"


class RemoteOpa(Model):
    """A remote OPA server's Data API."""

    url: HttpUrl
    timeout_seconds: float = Field(default=1.0, gt=0, alias="timeoutSeconds")


class Rego(Model):
    """A Rego policy: inline ``module``, a ConfigMap key, or a remote OPA server.

    ``query`` names the rule to evaluate (``data.<package path>.<rule>``); its
    value decides: ``true`` allows, ``false`` or undefined denies, and an
    object ``{"allow": bool, "reason": str}`` allows or denies with a reason.
    """

    query: str = "data.mcp.allow"
    module: str | None = None
    config_map_ref: KeyRef | None = Field(default=None, alias="configMapRef")
    remote: RemoteOpa | None = None

    @field_validator("query")
    @classmethod
    def _data_ref(cls, value: str) -> str:
        if not re.fullmatch(r"data(\.[A-Za-z_][A-Za-z0-9_]*)+", value):
            raise ValueError(f"must be a data reference such as 'data.mcp.allow', got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [n for n in ("module", "config_map_ref", "remote") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of module, configMapRef or remote")
        return self


class MCPToolPolicySpec(Model):
    """Rules over the tools of the target servers."""

    target_refs: list[TargetRef] = Field(min_length=1, alias="targetRefs")
    rules: list[ToolRule] = Field(default_factory=list)
    rate_limit: RateLimit | None = Field(default=None, alias="rateLimit")
    rego: Rego | None = None


class MCPToolPolicy(Model):
    """``kind: MCPToolPolicy``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPToolPolicy"]
    metadata: ObjectMeta
    spec: MCPToolPolicySpec

    @property
    def name(self) -> str:
        """The policy's name."""
        return self.metadata.name


# --- MCPAgent ------------------------------------------------------------------------------

DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_ASYMMETRIC = frozenset(DEFAULT_ALGORITHMS)


class JwtIdentity(Model):
    """Inbound JWTs: who signs them and for whom.

    Attributes:
        issuer: the required ``iss``.
        audiences: accepted ``aud`` values (one must match).
        jwks_uri: where the signing keys are published.
        algorithms: accepted signature algorithms (asymmetric only; never ``none``).
        subjects: optional ``sub`` globs, to tell agents of one issuer apart.
    """

    issuer: str
    audiences: list[str] = Field(min_length=1)
    jwks_uri: HttpUrl = Field(alias="jwksUri")
    algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    subjects: list[str] = Field(default_factory=list)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if a not in _ASYMMETRIC]
        if bad or not value:
            raise ValueError(f"must be a non-empty subset of {list(DEFAULT_ALGORITHMS)}; got {bad or value}")
        return value


_SPIFFE_SEGMENT = r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$"
"""A trust domain or service account name as a SPIFFE ID segment: lower-case, no ``/``."""


class Identity(Model):
    """How an agent proves who it is: a bearer JWT, its workload's mTLS identity, or both.

    Attributes:
        jwt: inbound JWTs (``Authorization: Bearer``); their ``sub`` is the principal.
        service_account: the Kubernetes service account the agent's pods run as. Where
            Envoy terminates the agent's mTLS, a peer certificate whose URI SAN is
            ``spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`` (Istio's
            workload identity; the namespace is the agent's) is this agent.
        trust_domain: the SPIFFE trust domain of that identity.
    """

    jwt: JwtIdentity | None = None
    service_account: Annotated[str, StringConstraints(pattern=_SPIFFE_SEGMENT, max_length=253)] | None = Field(
        default=None, alias="serviceAccount"
    )
    trust_domain: Annotated[str, StringConstraints(pattern=_SPIFFE_SEGMENT, max_length=255)] = Field(
        default="cluster.local", alias="trustDomain"
    )

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.jwt is None and self.service_account is None:
            raise ValueError(
                "set jwt, serviceAccount or both; an agent the deployment identifies (a sidecar) leaves identity out"
            )
        return self


class TrustGrant(Model):
    """The trust an agent is granted, and the claim carrying the user's consent."""

    granted: Trust = Trust.LOW
    consent_claim: str | None = Field(default=None, alias="consentClaim")


class Egress(Model):
    """How an agent pod's egress is limited (cluster only).

    Attributes:
        sidecar_only: an init container's iptables rules let only the Envoy
            sidecar's UID leave the pod (besides loopback and DNS).
    """

    sidecar_only: bool = Field(default=False, alias="sidecarOnly")


class MCPAgentSpec(Model):
    """A workload that calls MCP servers through the sidecar.

    Attributes:
        selector: the agent's pods (cluster only).
        mcp_server_refs: the servers the agent may use.
        policy_refs: tool policies applied to the agent's calls.
        identity: how the agent proves who it is (inbound JWT, mTLS service account);
            left out, the deployment identifies it (the one agent a sidecar or
            ``up`` serves: every caller without a token is this agent).
        trust: the trust the agent is granted.
        attachment: cluster only: ``Sidecar`` injects an Envoy sidecar and the
            extension server into the pods; ``Istio`` inserts ext_proc into the
            pods' Istio sidecar with an ``EnvoyFilter``.
        egress: cluster only: per-container egress enforcement.
    """

    selector: LabelSelector | None = None
    mcp_server_refs: list[ServerRef] = Field(min_length=1, alias="mcpServerRefs")
    policy_refs: list[LocalRef] = Field(default_factory=list, alias="policyRefs")
    identity: Identity | None = None
    trust: TrustGrant = Field(default_factory=TrustGrant)
    attachment: Literal["Sidecar", "Istio"] = "Sidecar"
    egress: Egress = Field(default_factory=Egress)


class MCPAgent(Model):
    """``kind: MCPAgent``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPAgent"]
    metadata: ObjectMeta
    spec: MCPAgentSpec

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.metadata.name

    @property
    def jwt(self) -> JwtIdentity | None:
        """The JWTs that identify this agent, if it declares any."""
        return self.spec.identity.jwt if self.spec.identity is not None else None

    @property
    def spiffe_id(self) -> str | None:
        """``spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>``, if it declares a service account."""
        ident = self.spec.identity
        if ident is None or ident.service_account is None:
            return None
        return f"spiffe://{ident.trust_domain}/ns/{self.metadata.namespace}/sa/{ident.service_account}"


# --- MCPVirtualServer ----------------------------------------------------------------------


class VirtualBackend(Model):
    """One server behind a virtual server.

    Attributes:
        name: an ``MCPServer`` in the same file (namespace).
        prefix: put before its tool and prompt names (``github_`` makes ``search`` appear
            as ``github_search``) and, as ``<name>+``, before its resource URIs; left out,
            names and URIs appear as the server has them and must not collide with
            another backend's. Letters, digits, ``_``, ``-`` and ``.`` (what a tool name
            may hold); immutable in the cluster.
    """

    name: str
    prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class MCPVirtualServerSpec(Model):
    r"""One endpoint, ``/<name>/mcp``, over several ``MCPServer``\ s.

    Attributes:
        servers: the backends, in the order their tools are listed.
    """

    servers: list[VirtualBackend] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        names = [b.name for b in self.servers]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"server {name!r} is listed twice")
        prefixes = [b.prefix for b in self.servers if b.prefix is not None]
        for a in prefixes:
            for b in prefixes:
                if a != b and b.startswith(a):
                    raise ValueError(f"prefix {a!r} starts prefix {b!r}: a name could belong to either server")
            if prefixes.count(a) > 1:
                raise ValueError(f"prefix {a!r} is used twice")
        return self


class MCPVirtualServer(Model):
    """``kind: MCPVirtualServer``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPVirtualServer"]
    metadata: ObjectMeta
    spec: MCPVirtualServerSpec

    @property
    def name(self) -> str:
        """Its name: agents reach it at ``/<name>/mcp``."""
        return self.metadata.name

    def backend(self, name: str) -> VirtualBackend | None:
        """The backend entry of server ``name``, if it is one."""
        return next((b for b in self.spec.servers if b.name == name), None)


# --- MCPAccessGrant, MCPConsent ----------------------------------------------------------


class Subject(Model):
    """Whom a grant or a consent is for: every field given must match.

    Attributes:
        user: the validated token's user (its ``sub``, or the claim the ``policy``
            stage's ``userClaim`` names); a caller without a token has no user.
        agent: the ``MCPAgent`` the caller was matched to.
        group: one of the token's groups (the ``groupsClaim`` claim, ``groups`` by default).
    """

    user: str | None = Field(default=None, min_length=1)
    agent: str | None = Field(default=None, min_length=1)
    group: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.user is None and self.agent is None and self.group is None:
            raise ValueError("set user, agent, group or several: an empty subject would match every caller")
        return self

    def shown(self) -> str:
        """``user=alice,agent=ops`` (for messages and status)."""
        return ",".join(f"{k}={v}" for k, v in (("user", self.user), ("agent", self.agent), ("group", self.group)) if v)


class MCPAccessGrantSpec(Model):
    """What a subject may do on the target servers.

    Attributes:
        target_refs: the servers (or virtual servers) it applies to.
        subject: whom it is for.
        max_trust: the highest effective trust it gives (the ceiling).
        allowed_side_effects: the side effects of the tools it covers; a destructive
            tool needs a grant that allows ``destructive``.
        tool_rules: optional rules (as in ``MCPToolPolicy``): a ``Deny`` rule takes
            the tools it matches out of the grant; an ``Allow`` rule's
            ``requiredTrust`` adds to what the call needs.
        disabled: a disabled grant gives nothing.
    """

    target_refs: list[ServerRef] = Field(min_length=1, alias="targetRefs")
    subject: Subject
    max_trust: Trust = Field(alias="maxTrust")
    allowed_side_effects: list[SideEffect] = Field(
        default_factory=lambda: [SideEffect.READ, SideEffect.WRITE], min_length=1, alias="allowedSideEffects"
    )
    tool_rules: list[ToolRule] = Field(default_factory=list, alias="toolRules")
    disabled: bool = False

    @model_validator(mode="after")
    def _plain_rules(self) -> Self:
        for i, rule in enumerate(self.tool_rules):
            if rule.scopes or rule.side_effect is not None:
                raise ValueError(
                    f"toolRules[{i}]: a grant's rules take tools, action and requiredTrust only; "
                    "declare scopes and sideEffect in an MCPToolPolicy rule"
                )
        return self


class MCPAccessGrant(Model):
    """``kind: MCPAccessGrant``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPAccessGrant"]
    metadata: ObjectMeta
    spec: MCPAccessGrantSpec

    @property
    def name(self) -> str:
        """The grant's name."""
        return self.metadata.name

    def targets(self, server: str, virtual: str | None) -> bool:
        """True when it applies to ``server`` (or to the virtual server the call came through)."""
        return any(_refers(ref, server, virtual) for ref in self.spec.target_refs)


class MCPConsentSpec(Model):
    """The trust a user consented to for an agent on one server.

    Attributes:
        server_ref: the server (or virtual server).
        subject: whose consent (usually ``user`` and ``agent``).
        consented_trust: the highest effective trust consented to.
        expires_at: when it lapses (RFC 3339 with a time zone); left out, it does not.
        revoked: a revoked consent refuses every call it covers.
    """

    server_ref: ServerRef = Field(alias="serverRef")
    subject: Subject
    consented_trust: Trust = Field(alias="consentedTrust")
    expires_at: AwareDatetime | None = Field(default=None, alias="expiresAt")
    revoked: bool = False


class MCPConsent(Model):
    """``kind: MCPConsent``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPConsent"]
    metadata: ObjectMeta
    spec: MCPConsentSpec

    @property
    def name(self) -> str:
        """The consent's name."""
        return self.metadata.name

    def targets(self, server: str, virtual: str | None) -> bool:
        """True when it covers ``server`` (or the virtual server the call came through)."""
        return _refers(self.spec.server_ref, server, virtual)

    def expired(self, now: datetime) -> bool:
        """True once ``expiresAt`` has come (the consent lapses at that instant); ``now`` is aware."""
        expires = self.spec.expires_at
        return expires is not None and now >= expires


def _refers(ref: ServerRef, server: str, virtual: str | None) -> bool:
    if ref.kind == "MCPServer":
        return ref.name == server
    return virtual is not None and ref.name == virtual


# --- core v1 -------------------------------------------------------------------------------


class Secret(Model):
    """``apiVersion: v1, kind: Secret``; ``data`` is base64, ``stringData`` plain text."""

    api_version: Literal["v1"] = Field(alias="apiVersion")
    kind: Literal["Secret"]
    metadata: ObjectMeta
    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict)
    string_data: dict[str, str] = Field(default_factory=dict, alias="stringData")

    @property
    def name(self) -> str:
        """The Secret's name."""
        return self.metadata.name

    def __repr__(self) -> str:  # never show secret values in logs or tracebacks
        return f"Secret(name={self.name!r}, keys={sorted({*self.data, *self.string_data})})"

    __str__ = __repr__


class ConfigMap(Model):
    """``apiVersion: v1, kind: ConfigMap``."""

    api_version: Literal["v1"] = Field(alias="apiVersion")
    kind: Literal["ConfigMap"]
    metadata: ObjectMeta
    data: dict[str, str] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        """The ConfigMap's name."""
        return self.metadata.name


Resource = MCPServer | MCPToolPolicy | MCPAgent | MCPVirtualServer | MCPAccessGrant | MCPConsent | Secret | ConfigMap

KINDS: dict[tuple[str, str], type[Resource]] = {
    (API_VERSION, "MCPServer"): MCPServer,
    (API_VERSION, "MCPToolPolicy"): MCPToolPolicy,
    (API_VERSION, "MCPAgent"): MCPAgent,
    (API_VERSION, "MCPVirtualServer"): MCPVirtualServer,
    (API_VERSION, "MCPAccessGrant"): MCPAccessGrant,
    (API_VERSION, "MCPConsent"): MCPConsent,
    ("v1", "Secret"): Secret,
    ("v1", "ConfigMap"): ConfigMap,
}
"""(apiVersion, kind) → model."""
