"""Status conditions of the custom resources: Accepted, ResolvedRefs, Ready; an MCPConsent's Expired and Revoked. Pure.

Data flow::

    (validation error | reference/render problems | apply error) + previous status + now
        ──▶ {"observedGeneration": g, "conditions": [Accepted, ResolvedRefs, Ready, *extra]}
    MCPConsent + now ──consent_conditions──▶ extra: Expired, Revoked
    Catalog + now    ──next_expiry──▶ when the next consent lapses (the loop reconciles then)

``lastTransitionTime`` changes only when a condition's status changes, as the
Kubernetes API conventions ask. Messages name absolute times, never "in 5 minutes", so an
unchanged resource keeps an unchanged status (and is not rewritten).

The conditions:

* ``Accepted``: the spec is valid (``False``, reason ``Invalid``: the validation error).
* ``ResolvedRefs``: every reference resolves (``False``, reason ``RefNotResolved``: which).
* ``Ready``: the configuration is applied (``False``: ``Invalid``, ``RefNotResolved`` or
  ``ApplyFailed``).
* ``Expired`` (MCPConsent): ``True`` (reason ``Expired``) once ``spec.expiresAt`` has
  passed, ``False`` before (reason ``NotExpired``) or without one (reason ``NoExpiry``).
* ``Revoked`` (MCPConsent): ``True`` (reason ``Revoked``) when ``spec.revoked``, else ``False``
  (reason ``NotRevoked``).

Expired and Revoked are informational: the extension server reads ``expiresAt`` and
``revoked`` itself and refuses a lapsed or revoked consent whatever the status says.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from extproc.config.models import MCPConsent

ACCEPTED: Final = "Accepted"
RESOLVED_REFS: Final = "ResolvedRefs"
READY: Final = "Ready"
EXPIRED: Final = "Expired"
REVOKED: Final = "Revoked"
_MAX_MESSAGE: Final = 32768


class Condition(NamedTuple):
    """A condition beyond the three every kind has: its type, status (``True``/``False``), reason, message."""

    type: str
    status: bool
    reason: str
    message: str


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:_MAX_MESSAGE],
        "observedGeneration": generation,
    }


def rfc3339(moment: datetime.datetime) -> str:
    """``moment`` in UTC, to the second: ``2026-12-31T00:00:00Z``."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def consent_conditions(consent: MCPConsent, now: datetime.datetime) -> list[Condition]:
    """``Expired`` and ``Revoked`` of a valid consent at ``now`` (an aware datetime)."""
    expires_at = consent.spec.expires_at
    if expires_at is None:
        lapse = Condition(EXPIRED, False, "NoExpiry", "no spec.expiresAt: the consent does not lapse")
    elif consent.expired(now):
        lapse = Condition(
            EXPIRED, True, "Expired", f"expired at {rfc3339(expires_at)}: the calls it covered are refused"
        )
    else:
        lapse = Condition(EXPIRED, False, "NotExpired", f"expires at {rfc3339(expires_at)}")
    if consent.spec.revoked:
        revoked = Condition(REVOKED, True, "Revoked", "spec.revoked: every call it covers is refused")
    else:
        revoked = Condition(REVOKED, False, "NotRevoked", "not revoked")
    return [lapse, revoked]


def next_expiry(consents: Iterable[MCPConsent], now: datetime.datetime) -> datetime.datetime | None:
    """The earliest ``expiresAt`` still to come among ``consents``, if any."""
    return min(
        (c.spec.expires_at for c in consents if c.spec.expires_at is not None and not c.expired(now)),
        default=None,
    )


def compute_status(
    resource: Mapping[str, Any],
    *,
    invalid: str | None = None,
    problems: Sequence[str] = (),
    apply_error: str | None = None,
    previous: Mapping[str, Any] | None = None,
    extra: Sequence[Condition] = (),
    now: str,
) -> dict[str, Any]:
    """The status of one custom resource.

    Args:
        resource: the object as read (its ``metadata.generation`` is observed).
        invalid: why the spec failed validation, if it did.
        problems: references that do not resolve, and what could not be rendered.
        apply_error: why applying the rendered objects failed, if it did.
        previous: the current ``status`` (for ``lastTransitionTime``).
        extra: conditions of the kind, after the three (:func:`consent_conditions`); left
            out when the spec is invalid.
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
        conditions += [_condition(c.type, c.status, c.reason, c.message, generation) for c in extra]
    before = {c.get("type"): c for c in (previous or {}).get("conditions", []) if isinstance(c, dict)}
    for condition in conditions:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        condition["lastTransitionTime"] = old["lastTransitionTime"] if same and old else now
    return {"observedGeneration": generation, "conditions": conditions}


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """True when writing ``b`` over ``a`` would change nothing (a ``None`` field deletes: absent is the same)."""

    def present(status: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (status or {}).items() if v is not None}

    return present(a) == present(b)
