"""``mcp-extproc stages``: the installed stages (entry points) and their configuration schema.

Data flow::

    entry points of group ``mcp_extproc.stages`` ──load + validate (Registry.get)──▶
        name, where it comes from (module:class, distribution and version),
        the phases its hooks read, the stages it requires, its Config's JSON schema
    ──▶ text for people, or ``--json`` for tools

A stage that fails to load is listed with the reason and makes the command exit 1.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.core.plan import phases_of
from extproc.core.registry import Registry
from extproc.errors import ExtProcError


def installed_stages(registry: Registry | None = None) -> list[dict[str, Any]]:
    """One entry per installed stage, sorted by name; ``error`` is set when it failed to load."""
    registry = registry or Registry()
    found = []
    for name, entry in sorted(registry.available().items()):
        dist = entry.dist
        item: dict[str, Any] = {
            "name": name,
            "source": entry.value,
            "distribution": f"{dist.name} {dist.version}" if dist else None,
        }
        try:
            cls = registry.get(name)
        except ExtProcError as exc:
            item["error"] = str(exc)
        else:
            item["summary"] = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            item["phases"] = [phase.value for phase in phases_of(cls)]
            item["requires"] = list(cls.requires)
            item["config_schema"] = cls.Config.model_json_schema(by_alias=True)
        found.append(item)
    return found


def format_stages(stages: list[dict[str, Any]]) -> str:
    """The human-readable listing."""
    lines = []
    for item in stages:
        lines.append(f"{item['name']}  ({item['source']}, {item['distribution'] or 'unknown distribution'})")
        if "error" in item:
            lines.append(f"  FAILED TO LOAD: {item['error']}")
            continue
        if item["summary"]:
            lines.append(f"  {item['summary']}")
        lines.append(f"  phases: {', '.join(item['phases']) or '-'}; requires: {', '.join(item['requires']) or '-'}")
        lines.append("  config schema: " + json.dumps(item["config_schema"], sort_keys=True))
    return "\n".join(lines) + "\n"
