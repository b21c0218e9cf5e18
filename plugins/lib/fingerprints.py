"""Tool-definition fingerprints: what a pin is taken over, and what changed between two definitions.

Data flow::

    one entry of a tools/list result (a JSON object)
        ──definition──▶ its defining fields only: name, title, description, inputSchema,
                        outputSchema, annotations (``_meta``, ``icons`` and unknown keys are left out)
        ──canonical──▶ JSON with sorted keys, no whitespace, ensure_ascii=False, UTF-8
        ──fingerprint──▶ "sha256:<64 hex digits>"

    pinned definition + current definition ──changes──▶ ["description", "inputSchema.properties.path", …]

The same definition always gives the same digest, whatever the key order or spacing the
server sent; any change to a defining field (one character of a description, a schema
keyword) gives another. ``pinnedTools`` in an ``MCPServer`` holds these digests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["DEFINING_FIELDS", "canonical", "changes", "definition", "fingerprint"]

DEFINING_FIELDS: Final = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
"""The fields a fingerprint covers, in the order :func:`changes` reports them."""
_SCHEMAS: Final = frozenset({"inputSchema", "outputSchema"})


def definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The defining fields ``tool`` has (see :data:`DEFINING_FIELDS`)."""
    return {key: tool[key] for key in DEFINING_FIELDS if key in tool}


def canonical(tool: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``tool``'s definition, as UTF-8: what :func:`fingerprint` hashes."""
    text = json.dumps(definition(tool), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def fingerprint(tool: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over :func:`canonical` of ``tool``."""
    return "sha256:" + hashlib.sha256(canonical(tool)).hexdigest()


def changes(pinned: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two definitions: top-level field names, and for schemas the paths changed.

    A schema's changes are named down to the first level that differs under ``properties``
    (``inputSchema.properties.path``), else by its keyword (``inputSchema.required``).
    """
    found: list[str] = []
    for key in DEFINING_FIELDS:
        old, new = pinned.get(key), current.get(key)
        if (key in pinned) == (key in current) and _same(old, new):
            continue
        if key in _SCHEMAS and isinstance(old, Mapping) and isinstance(new, Mapping):
            found.extend(f"{key}.{path}" for path in _schema_changes(old, new))
        else:
            found.append(key)
    return found


def _schema_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    paths: list[str] = []
    for keyword in sorted({*old, *new}):
        before, after = old.get(keyword), new.get(keyword)
        if _same(before, after):
            continue
        if keyword == "properties" and isinstance(before, Mapping) and isinstance(after, Mapping):
            paths.extend(
                f"properties.{name}"
                for name in sorted({*before, *after})
                if not _same(before.get(name), after.get(name))
            )
        else:
            paths.append(keyword)
    return paths


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
