"""CustomResourceDefinitions generated from the resource models (one source of truth). Pure.

Data flow::

    extproc.config.models.MCPServer / MCPToolPolicy / MCPAgent / MCPVirtualServer /
                          MCPAccessGrant / MCPConsent
        ──model_json_schema(by_alias=True)──▶ JSON Schema (2020-12, $defs/$ref, anyOf null)
        ──structural()──▶ Kubernetes structural OpenAPI v3: $refs inlined, ``nullable``,
                          ``exclusiveMinimum`` as a flag, no ``title``/``additionalProperties: false``,
                          field descriptions from the models' docstrings
        ──+ CEL ``x-kubernetes-validations`` mirroring the models' validators,
          status subresource (conditions + observedGeneration), printer columns
        ──▶ CustomResourceDefinition dicts / YAML files in ``deploy/crds/``

``python -m controller.render.crds [--check] [DIR]`` writes (or checks) the files;
``make crds`` runs it, and ``tests/unit/controller/test_crds.py`` fails when the
checked-in files drift from the models.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel
from pydantic.functional_validators import AfterValidator

from extproc.config import models
from extproc.config.models import (
    API_VERSION,
    TOOL_DIGEST_PATTERN,
    MCPAccessGrant,
    MCPAgent,
    MCPConsent,
    MCPServer,
    MCPToolPolicy,
    MCPVirtualServer,
)

GROUP: Final = API_VERSION.split("/")[0]
VERSION: Final = API_VERSION.split("/")[1]

_READY = '.status.conditions[?(@.type=="Ready")]'
_EXPIRED = '.status.conditions[?(@.type=="Expired")]'
_MAX_URL: Final = 2048
_HTTP_URL_RULE: Final = {
    # The same check as extproc.config.models.http_url: a scheme of http or https, then a host.
    "rule": "self.matches('^(?i:https?)://([^/?#@]*@)?[^/?#@:]+')",
    "message": "must be an http:// or https:// URL with a host",
}


def _exactly_one(*fields: str) -> dict[str, str]:
    listed = ", ".join(f"has(self.{f})" for f in fields)
    names = ", ".join(fields[:-1]) + f" or {fields[-1]}"
    return {"rule": f"[{listed}].filter(x, x).size() == 1", "message": f"set exactly one of {names}"}


# Model validators (``@model_validator``) as CEL, by model. Tested against pydantic's verdicts.
_MODEL_RULES: Final[dict[type[BaseModel], list[dict[str, str]]]] = {
    models.BearerAuth: [_exactly_one("secretRef", "env", "file")],
    models.UpstreamAuth: [_exactly_one("bearer", "clientCredentials", "tokenExchange")],
    models.Rego: [_exactly_one("module", "configMapRef", "remote")],
    models.Identity: [
        {
            "rule": "has(self.jwt) || has(self.serviceAccount)",
            "message": "set jwt, serviceAccount or both; an agent the deployment identifies (a sidecar) leaves "
            "identity out",
        }
    ],
    models.VirtualBackend: [
        {
            # A transition rule: the list is a map keyed by name, so an entry meets its old self.
            "rule": "has(self.prefix) == has(oldSelf.prefix) && (!has(self.prefix) || self.prefix == oldSelf.prefix)",
            "message": "prefix is immutable: agents and policies know the tools by it; "
            "remove the server and add it back to change it",
        }
    ],
    models.MCPVirtualServerSpec: [
        {
            "rule": "self.servers.all(a, !has(a.prefix) || self.servers.all(b, a.name == b.name || "
            "!has(b.prefix) || !b.prefix.startsWith(a.prefix)))",
            "message": "a prefix is used twice, or starts another: a name could belong to either server",
        }
    ],
    models.Subject: [
        {
            "rule": "has(self.user) || has(self.agent) || has(self.group)",
            "message": "set user, agent, group or several: an empty subject would match every caller",
        }
    ],
    models.MCPServerSpec: [
        {
            "rule": "!has(self.productionMode) || !self.productionMode || self.url.startsWith('https://')",
            "message": "productionMode requires an https:// url",
        },
        {
            "rule": "!has(self.productionMode) || !self.productionMode || (has(self.upstreamAuth)"
            " && (has(self.upstreamAuth.clientCredentials) || has(self.upstreamAuth.tokenExchange)))",
            "message": "productionMode requires upstreamAuth.clientCredentials or tokenExchange",
        },
    ],
}

# Field validators (``@field_validator``) as schema keywords, by (model, alias).
_FIELD_EXTRAS: Final[dict[tuple[type[BaseModel], str], dict[str, Any]]] = {
    (models.MCPServerSpec, "allowedTools"): {"items": {"pattern": r"\S"}},
    (models.MCPServerSpec, "deniedTools"): {"items": {"pattern": r"\S"}},
    (models.MCPVirtualServerSpec, "servers"): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    (models.Rego, "query"): {"pattern": r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$"},
    (models.JwtIdentity, "algorithms"): {"minItems": 1, "items": {"enum": list(models.DEFAULT_ALGORITHMS)}},
    # AwareDatetime: a time zone is required (``format: date-time``, which the API server
    # checks, is RFC 3339 and would otherwise also take a local time).
    (models.MCPConsentSpec, "expiresAt"): {"pattern": r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"},
    # MCPAccessGrantSpec's validator, on each rule (ToolRule is MCPToolPolicy's too, where both
    # are allowed); a rule per item keeps the CEL cost estimate flat over an unbounded list.
    (models.MCPAccessGrantSpec, "toolRules"): {
        "items": {
            "x-kubernetes-validations": [
                {
                    "rule": "(!has(self.scopes) || size(self.scopes) == 0) && !has(self.sideEffect)",
                    "message": "a grant's rules take tools, action and requiredTrust only; "
                    "declare scopes and sideEffect in an MCPToolPolicy rule",
                }
            ]
        }
    },
}


_DIGEST_SCHEMA: Final = {"type": "string", "pattern": TOOL_DIGEST_PATTERN}


def _named_list(description: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A status list of objects keyed by ``name`` (a list-map: one entry per name)."""
    return {
        "type": "array",
        "description": description,
        **extra,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "required": ["name"], "properties": properties},
    }


_TOOLS_STATUS: Final = _named_list(
    "Each tool the extension servers listed (controller.render.observed): its pin (digest, source declared or "
    "first-use, firstSeen) and, when changed, the definition last seen unlike it (current, changes). Approve a "
    "change by writing current into spec.pinnedTools.",
    {
        "name": {"type": "string", "maxLength": 256},
        "digest": _DIGEST_SCHEMA,
        "source": {"type": "string", "enum": ["declared", "first-use"]},
        "firstSeen": {"type": "string", "maxLength": 64},
        "changed": {"type": "boolean"},
        "current": _DIGEST_SCHEMA,
        "changes": {"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 256}},
    },
    maxItems=512,
)
_BACKENDS_STATUS: Final = _named_list(
    "Each backend: how many tools it last listed, and the merged names it shares with another backend (hidden "
    "and refused until one of them gets a prefix).",
    {
        "name": {"type": "string"},
        "prefix": {"type": "string"},
        "tools": {"type": "integer", "minimum": 0},
        "conflicts": {"type": "array", "items": {"type": "string"}},
    },
)


@dataclass(frozen=True)
class CrdKind:
    """One custom resource kind: its model and how ``kubectl`` shows it."""

    model: type[BaseModel]
    kind: str
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[tuple[str, str, str, int], ...]
    """(name, type, jsonPath, priority) of the printer columns before Ready/Reason/Age."""
    status_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Status properties of this kind beyond the shared ones (what the extension servers observed)."""

    @property
    def name(self) -> str:
        """The CRD's ``metadata.name``."""
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        """The file in ``deploy/crds/``."""
        return f"{GROUP}_{self.plural}.yaml"


CRD_KINDS: Final = (
    CrdKind(
        MCPServer,
        "MCPServer",
        "mcpservers",
        ("mcpsrv",),
        (
            ("URL", "string", ".spec.url", 0),
            ("Keepalive", "string", ".spec.keepalive", 1),
            ("Production", "boolean", ".spec.productionMode", 1),
        ),
        {"tools": _TOOLS_STATUS},
    ),
    CrdKind(
        MCPToolPolicy,
        "MCPToolPolicy",
        "mcptoolpolicies",
        ("mcptp",),
        (("Targets", "string", ".spec.targetRefs[*].name", 0),),
    ),
    CrdKind(
        MCPAgent,
        "MCPAgent",
        "mcpagents",
        ("mcpag",),
        (
            ("Attachment", "string", ".spec.attachment", 0),
            ("Servers", "string", ".spec.mcpServerRefs[*].name", 0),
        ),
    ),
    CrdKind(
        MCPVirtualServer,
        "MCPVirtualServer",
        "mcpvirtualservers",
        ("mcpvs",),
        (
            ("Servers", "string", ".spec.servers[*].name", 0),
            ("Prefixes", "string", ".spec.servers[*].prefix", 1),
        ),
        {"backends": _BACKENDS_STATUS},
    ),
    # One JSONPath cannot print a whole subject readably (an object prints as map[...]),
    # so its fields get a column each.
    CrdKind(
        MCPAccessGrant,
        "MCPAccessGrant",
        "mcpaccessgrants",
        ("mcpgrant",),
        (
            ("User", "string", ".spec.subject.user", 0),
            ("Agent", "string", ".spec.subject.agent", 0),
            ("Group", "string", ".spec.subject.group", 0),
            ("Targets", "string", ".spec.targetRefs[*].name", 0),
            ("Max Trust", "string", ".spec.maxTrust", 0),
            ("Side Effects", "string", ".spec.allowedSideEffects", 1),
            ("Disabled", "boolean", ".spec.disabled", 0),
        ),
    ),
    CrdKind(
        MCPConsent,
        "MCPConsent",
        "mcpconsents",
        ("mcpconsent",),
        (
            ("User", "string", ".spec.subject.user", 0),
            ("Agent", "string", ".spec.subject.agent", 0),
            ("Group", "string", ".spec.subject.group", 1),
            ("Server", "string", ".spec.serverRef.name", 0),
            ("Trust", "string", ".spec.consentedTrust", 0),
            # A string, not a date: kubectl prints a date as an age, and a future one as <invalid>.
            ("Expires", "string", ".spec.expiresAt", 0),
            ("Revoked", "boolean", ".spec.revoked", 0),
            ("Expired", "string", f"{_EXPIRED}.status", 0),
        ),
    ),
)


def _attribute_docs(model: type[BaseModel]) -> dict[str, str]:
    """Per-field descriptions from the ``Attributes:`` section of a Google-style docstring."""
    doc = model.__doc__ or ""
    out: dict[str, str] = {}
    if "Attributes:" not in doc:
        return out
    current = ""
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^\s{4,8}(\w+)(?:\s*/\s*\w+)*:\s*(.*)$", line)
        if match and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip() and current:
            current = ""
    return {name: re.sub(r"``([^`]+)``", r"\1", text) for name, text in out.items()}


def _is_http_url(field_metadata: Sequence[object]) -> bool:
    return any(isinstance(m, AfterValidator) and m.func is models.http_url for m in field_metadata)


def _field_extras(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """Schema keywords and descriptions to add to each property of ``model``, by alias."""
    docs = _attribute_docs(model)
    extras: dict[str, dict[str, Any]] = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        extra: dict[str, Any] = copy.deepcopy(_FIELD_EXTRAS.get((model, alias), {}))
        if name in docs:
            extra["description"] = docs[name]
        elif field.description:
            extra["description"] = field.description
        if _is_http_url(field.metadata):
            extra["maxLength"] = _MAX_URL
            extra["x-kubernetes-validations"] = [dict(_HTTP_URL_RULE)]
        extras[alias] = extra
    return extras


def _models_by_title() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for value in vars(models).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == models.__name__:
            found[value.__name__] = value
    return found


def _merge(target: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


class _Converter:
    """JSON Schema (pydantic) → Kubernetes structural schema."""

    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.by_title = _models_by_title()

    def convert(self, node: dict[str, Any]) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:
            target = self.defs[node.pop("$ref").rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "title"}}
            return self.convert(merged)
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
            if len(options) != 1:
                raise ValueError(f"cannot express anyOf {options!r} as a structural schema")
            inner = self.convert(options[0])
            rest = self.convert(node) if node else {}
            return {**inner, **{k: v for k, v in rest.items() if k != "type"}, "nullable": True}
        out: dict[str, Any] = {}
        model = self.by_title.get(str(node.get("title", "")))
        for key, value in node.items():
            if key in ("title", "$defs"):
                continue
            if key == "additionalProperties":
                if isinstance(value, dict):
                    out[key] = self.convert(value)
                continue  # `false` is not allowed; unknown fields are pruned (or refused with strict validation)
            if key == "default":
                if isinstance(value, str | int | float | bool) and not isinstance(value, list):
                    out[key] = value
                continue
            if key == "const":
                out["enum"] = [value]
                continue
            if key == "exclusiveMinimum":
                out["minimum"] = value
                out["exclusiveMinimum"] = True
                continue
            if key == "items":
                out[key] = self.convert(value)
                continue
            if key == "properties":
                out[key] = {name: self.convert(prop) for name, prop in value.items()}
                continue
            out[key] = value
        if model is not None and node.get("type") == "object":
            for alias, extra in _field_extras(model).items():
                if alias in out.get("properties", {}):
                    _merge(out["properties"][alias], extra)
            if model in _MODEL_RULES:
                out["x-kubernetes-validations"] = [dict(r) for r in _MODEL_RULES[model]]
            if "description" in out:
                out["description"] = out["description"].split("\n\nAttributes:")[0].replace("``", "")
        return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema as a Kubernetes structural schema (no ``$ref``)."""
    raw = model.model_json_schema(by_alias=True)
    return _Converter(raw.get("$defs", {})).convert(raw)


def _condition_schema() -> dict[str, Any]:
    """``metav1.Condition``, as every Kubernetes API declares it."""
    return {
        "type": "object",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "maxLength": 316},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "reason": {"type": "string", "maxLength": 1024, "minLength": 1},
            "message": {"type": "string", "maxLength": 32768},
        },
    }


def status_schema(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The status every kind shares: conditions (Accepted, ResolvedRefs, Ready; an MCPConsent's
    Expired and Revoked too: :mod:`controller.render.status`) and observedGeneration; plus ``extra``."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": "Written by the controller.",
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "conditions": {
                "type": "array",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }
    schema["properties"].update(copy.deepcopy(dict(extra or {})))
    return schema


def crd(kind: CrdKind) -> dict[str, Any]:
    """The ``CustomResourceDefinition`` of ``kind``."""
    model_schema = structural_schema(kind.model)
    spec = model_schema["properties"]["spec"]
    schema: dict[str, Any] = {
        "type": "object",
        "description": f"{kind.kind}: " + spec.get("description", ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(kind.status_fields),
        },
        "x-kubernetes-validations": [
            {
                # Names become URL paths (/<name>/mcp) and Envoy cluster names.
                "rule": "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1123 label (at most 63 characters)",
            }
        ],
    }
    columns = [
        {"name": n, "type": t, "jsonPath": p, **({"priority": pr} if pr else {})} for n, t, p, pr in kind.columns
    ]
    columns += [
        {"name": "Ready", "type": "string", "jsonPath": f"{_READY}.status"},
        {"name": "Reason", "type": "string", "jsonPath": f"{_READY}.reason", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.name, "labels": {"app.kubernetes.io/part-of": "mcp-extproc"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": ["mcp"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


_HEADER: Final = (
    "# Generated from extproc/config/models.py by `make crds` (python -m controller.render.crds). Do not edit.\n"
)


def render_crd_files() -> dict[str, str]:
    """Every CRD as YAML text, by file name."""
    return {k.filename: _HEADER + yaml.dump(crd(k), Dumper=_Dumper, sort_keys=False, width=120) for k in CRD_KINDS}


def main(argv: Sequence[str] | None = None) -> int:
    """Write the CRD files, or with ``--check`` report the ones that differ (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m controller.render.crds", description=main.__doc__)
    parser.add_argument("directory", nargs="?", default="deploy/crds", type=Path)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_crd_files().items():
        path: Path = args.directory / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("stale CRDs (run `make crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
