"""Status conditions of the custom resources: Accepted, ResolvedRefs, Ready. Pure.

Data flow::

    (validation error | reference/render problems | apply error) + previous status + now
        ──▶ {"observedGeneration": g, "conditions": [Accepted, ResolvedRefs, Ready]}

``lastTransitionTime`` changes only when a condition's status changes, as the
Kubernetes API conventions ask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

ACCEPTED: Final = "Accepted"
RESOLVED_REFS: Final = "ResolvedRefs"
READY: Final = "Ready"
_MAX_MESSAGE: Final = 32768


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:_MAX_MESSAGE],
        "observedGeneration": generation,
    }


def compute_status(
    resource: Mapping[str, Any],
    *,
    invalid: str | None = None,
    problems: Sequence[str] = (),
    apply_error: str | None = None,
    previous: Mapping[str, Any] | None = None,
    now: str,
) -> dict[str, Any]:
    """The status of one custom resource.

    Args:
        resource: the object as read (its ``metadata.generation`` is observed).
        invalid: why the spec failed validation, if it did.
        problems: references that do not resolve, and what could not be rendered.
        apply_error: why applying the rendered objects failed, if it did.
        previous: the current ``status`` (for ``lastTransitionTime``).
        now: RFC 3339 time of this reconcile.
    """
    generation = int((resource.get("metadata") or {}).get("generation") or 0)
    if invalid is not None:
        conditions = [
            _condition(ACCEPTED, False, "Invalid", invalid, generation),
            _condition(RESOLVED_REFS, False, "Invalid", "the spec is invalid", generation),
            _condition(READY, False, "Invalid", invalid, generation),
        ]
    else:
        accepted = _condition(ACCEPTED, True, "Accepted", "the spec is valid", generation)
        if problems:
            text = "; ".join(problems)
            resolved = _condition(RESOLVED_REFS, False, "RefNotResolved", text, generation)
            ready = _condition(READY, False, "RefNotResolved", text, generation)
        else:
            resolved = _condition(RESOLVED_REFS, True, "ResolvedRefs", "every reference resolves", generation)
            if apply_error is not None:
                ready = _condition(READY, False, "ApplyFailed", apply_error, generation)
            else:
                ready = _condition(READY, True, "Ready", "configuration applied", generation)
        conditions = [accepted, resolved, ready]
    before = {c.get("type"): c for c in (previous or {}).get("conditions", []) if isinstance(c, dict)}
    for condition in conditions:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        condition["lastTransitionTime"] = old["lastTransitionTime"] if same and old else now
    return {"observedGeneration": generation, "conditions": conditions}


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """True when writing ``b`` over ``a`` would change nothing."""
    return dict(a or {}) == dict(b)
