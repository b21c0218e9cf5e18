"""Resource documents (``apiVersion: mcp.extproc.io/v1alpha1``): models and the YAML loader.

The same documents drive ``mcp-extproc up`` on a laptop and the controller in a
cluster. Locally they sit in one multi-document YAML file::

    file ──yaml.safe_load_all──▶ documents ──validate(kind)──▶ Catalog{servers}

Every error names the file, the document's position, its kind and name, and the
field that was wrong, e.g. ``resources.yaml: document 2 (MCPServer "demo"):
spec.url: must be an http:// or https:// URL``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from extproc.errors import ConfigError

API_VERSION = "mcp.extproc.io/v1alpha1"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ObjectMeta(_Model):
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


class MCPServerSpec(_Model):
    """An upstream MCP server reached over Streamable HTTP.

    Attributes:
        url: the server's Streamable HTTP endpoint (``http://`` or ``https://``).
        allowed_tools: globs of tools agents may call; empty allows none,
            ``["*"]`` allows all.
        denied_tools: globs of tools refused even when allowed.
    """

    url: str
    allowed_tools: list[str] = Field(default_factory=list, alias="allowedTools")
    denied_tools: list[str] = Field(default_factory=list, alias="deniedTools")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"has a malformed port: {value!r}") from exc
        return value

    @field_validator("allowed_tools", "denied_tools")
    @classmethod
    def _non_empty_globs(cls, value: list[str]) -> list[str]:
        for glob in value:
            if not glob.strip():
                raise ValueError("tool globs must not be empty strings")
        return value


class MCPServer(_Model):
    """``kind: MCPServer``."""

    api_version: Literal["mcp.extproc.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MCPServer"]
    metadata: ObjectMeta
    spec: MCPServerSpec

    @property
    def name(self) -> str:
        """The server's name: agents reach it at ``/<name>/mcp``."""
        return self.metadata.name


_KINDS: Mapping[str, type[_Model]] = {"MCPServer": MCPServer}


@dataclass(frozen=True)
class Catalog:
    """Every resource loaded, by kind and name."""

    servers: Mapping[str, MCPServer] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def server_for_path(self, path: str) -> MCPServer | None:
        """The server whose agent-facing prefix ``/<name>/`` starts ``path``."""
        parts = path.split("/", 2)
        if len(parts) < 2:
            return None
        return self.servers.get(parts[1])


def _field_path(loc: Iterable[int | str], model: type[_Model]) -> str:
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
    servers: dict[str, MCPServer] = {}
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{source}: document {index}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a mapping with apiVersion, kind, metadata and spec")
        kind = doc.get("kind")
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        label = f"{where} ({kind} {name!r})" if name else f"{where} ({kind})"
        if doc.get("apiVersion") != API_VERSION:
            raise ConfigError(f"{label}: apiVersion: must be {API_VERSION!r}, got {doc.get('apiVersion')!r}")
        model = _KINDS.get(str(kind))
        if model is None:
            raise ConfigError(f"{label}: kind: must be one of {sorted(_KINDS)}, got {kind!r}")
        try:
            resource = model.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            fields = _field_path(first["loc"], model)
            raise ConfigError(f"{label}: {fields}: {first['msg']}") from None
        if isinstance(resource, MCPServer):
            if resource.name in servers:
                raise ConfigError(f"{label}: metadata.name: duplicate MCPServer {resource.name!r}")
            servers[resource.name] = resource
    return Catalog(servers=servers, sources=(source,))


def load_resources(path: str | Path) -> Catalog:
    """Load and validate a multi-document YAML file of resources.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or a document is invalid.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    catalog = parse_documents(docs, source)
    if not catalog.servers:
        raise ConfigError(f"{source}: no MCPServer documents; add at least one (see README, 'MCPServer')")
    return catalog
