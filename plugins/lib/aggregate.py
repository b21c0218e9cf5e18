"""A virtual server's names: prefixes on the way out, owners on the way in, merged lists. Pure.

What an agent sees of a backend named ``github`` with ``prefix: github_``::

    tool / prompt "search"            ──▶ "github_search"
    resource "file:///a"              ──▶ "github+file:///a"  (the server's name and "+" before the
                                          scheme: still a URI, and never taken for another's)
    resource template "db://{t}"      ──▶ "github+db://{t}"
    server request id 7 (sampling...) ──▶ "mcpx~github~7"     (answers come back to github as 7)

Without a prefix, names and URIs go out as they are. Coming in, :class:`Names` finds the
owner of a name from what each backend last listed (:func:`list_names`): a prefixed name
goes to its prefix's backend, an unprefixed one to the backend that listed it. A final
name two backends would both produce is a conflict: hidden from the merged list and
refused by name of both backends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.config.models import MCPVirtualServer, VirtualBackend

LISTS: Final[Mapping[str, tuple[str, str]]] = {
    "tools/list": ("tools", "name"),
    "prompts/list": ("prompts", "name"),
    "resources/list": ("resources", "uri"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate"),
}
"""List method ─▶ (the result's array, the key naming each item)."""

KIND_OF_CALL: Final[Mapping[str, str]] = {
    "tools/call": "tools/list",
    "prompts/get": "prompts/list",
    "resources/read": "resources/list",
    "resources/subscribe": "resources/list",
    "resources/unsubscribe": "resources/list",
}
"""A call ─▶ the list whose names it uses."""

_ID_MARK: Final = "mcpx~"


def is_uri_kind(kind: str) -> bool:
    """True for the lists whose items are named by URI."""
    return kind.startswith("resources/")


def outward(backend: VirtualBackend, kind: str, name: str) -> str:
    """What the agent sees of ``backend``'s item ``name`` in list ``kind``."""
    if backend.prefix is None:
        return name
    if is_uri_kind(kind):
        return f"{backend.name}+{name}"
    return backend.prefix + name


@dataclass(frozen=True, slots=True)
class Owner:
    """The backend an incoming name belongs to, and the name it has there."""

    backend: VirtualBackend
    inner: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two or more backends would each take this name."""

    backends: tuple[str, ...]

    def message(self, name: str, virtual: str) -> str:
        """The error the agent gets."""
        names = " and ".join(repr(b) for b in self.backends)
        return (
            f"{name!r} on virtual server {virtual!r} is ambiguous: MCP servers {names} both provide it; "
            "give one of them a prefix"
        )


@dataclass
class Names:
    """What each backend last listed, per list kind (its own names, unprefixed)."""

    virtual: MCPVirtualServer
    listed: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def known(self, backend: str, kind: str) -> frozenset[str] | None:
        """The names ``backend`` last listed in ``kind``; ``None`` if it never answered."""
        return self.listed.get((backend, kind))

    def learn(self, backend: str, kind: str, names: Iterable[str]) -> None:
        """``backend`` listed ``names`` in ``kind``."""
        self.listed[(backend, kind)] = frozenset(names)

    def owners(self, kind: str, name: str) -> list[Owner]:
        """Every backend that would take ``name`` in list ``kind`` (more than one: a conflict).

        An unprefixed backend takes a resource URI it listed, or one that matches a
        template it listed (``resources/templates/list``).
        """
        found: list[Owner] = []
        for backend in self.virtual.spec.servers:
            known = self.known(backend.name, kind)
            if backend.prefix is None:
                templates = self.known(backend.name, "resources/templates/list") if kind == "resources/list" else None
                if (known is not None and name in known) or any(matches(t, name) for t in templates or ()):
                    found.append(Owner(backend, name))
                continue
            head = f"{backend.name}+" if is_uri_kind(kind) else backend.prefix
            if name.startswith(head):
                inner = name[len(head) :]
                if known is None or inner in known or kind == "resources/list":
                    # Unknown names (the server never answered) and resource URIs (a template
                    # may produce any) go to the prefix's server, whose answer says more.
                    found.append(Owner(backend, inner))
        return found

    def conflicts(self, kind: str) -> dict[str, Conflict]:
        """Final names of ``kind`` that more than one backend produces."""
        seen: dict[str, list[str]] = {}
        for backend in self.virtual.spec.servers:
            for name in self.known(backend.name, kind) or ():
                seen.setdefault(outward(backend, kind, name), []).append(backend.name)
        return {name: Conflict(tuple(owners)) for name, owners in seen.items() if len(owners) > 1}


def matches(template: str, uri: str) -> bool:
    """True when ``uri`` is one that the RFC 6570 ``template`` can produce (any expression, any value)."""
    pattern = ""
    for literal, expression in re.findall(r"([^{]*)(\{[^}]*\})?", template):
        pattern += re.escape(literal)
        if expression:
            # {+x} and {#x} may hold "/"; simple expansions may not.
            pattern += ".*" if expression[1:2] in ("+", "#", "/", "?", "&", ";", ".") else "[^/?#]*"
    return re.fullmatch(pattern, uri) is not None


def list_names(kind: str, result: Any) -> list[str]:
    """The item names of a list result (those that are strings)."""
    array, key = LISTS[kind]
    items = result.get(array) if isinstance(result, dict) else None
    if not isinstance(items, list):
        return []
    return [item[key] for item in items if isinstance(item, dict) and isinstance(item.get(key), str)]


def merge(
    kind: str, names: Names, answers: Sequence[tuple[VirtualBackend, Any]]
) -> tuple[dict[str, Any], dict[str, Conflict]]:
    """One list result from the backends' (already filtered) results, in backend order.

    Every item passes through unchanged but its name (or URI); an item whose final name
    is a conflict is left out. Returns the result and the conflicts found.
    """
    array, key = LISTS[kind]
    conflicts = names.conflicts(kind)
    merged: list[Any] = []
    for backend, result in answers:
        items = result.get(array) if isinstance(result, dict) else None
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict) or not isinstance(item.get(key), str):
                continue
            final = outward(backend, kind, item[key])
            if final in conflicts:
                continue
            merged.append({**item, key: final})
    return {array: merged}, conflicts


def union_capabilities(all_capabilities: Iterable[Any]) -> dict[str, Any]:
    """The union of servers' capabilities: every key any has; flags true if any says so."""
    out: dict[str, Any] = {}
    for capabilities in all_capabilities:
        if isinstance(capabilities, dict):
            _merge_into(out, capabilities)
    return out


def _merge_into(out: dict[str, Any], more: Mapping[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict):
            target = out.get(key)
            if not isinstance(target, dict):
                target = out[key] = {}
            _merge_into(target, value)
        elif isinstance(value, bool):
            out[key] = bool(out.get(key)) or value
        else:
            out.setdefault(key, value)


def wrap_id(backend: str, request_id: Any) -> str:
    """The id the agent sees for a request ``backend`` sent it (sampling, elicitation, roots)."""
    return f"{_ID_MARK}{backend}~{json.dumps(request_id, separators=(',', ':'))}"


def unwrap_id(value: Any) -> tuple[str, Any] | None:
    """``(backend, its own id)`` for an id :func:`wrap_id` made; ``None`` for any other."""
    if not isinstance(value, str) or not value.startswith(_ID_MARK):
        return None
    backend, sep, raw = value[len(_ID_MARK) :].partition("~")
    if not sep or not backend:
        return None
    try:
        original = json.loads(raw)
    except (ValueError, RecursionError):  # the agent chose this id: deep nesting must not raise
        return None
    if not isinstance(original, str | int) or isinstance(original, bool):
        return None
    return backend, original
