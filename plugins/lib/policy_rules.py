"""The pure half of the ``policy`` stage: rules, trust and the Rego input document.

No I/O here. :func:`check_rules` decides from a policy's rules alone;
:func:`rego_input` builds the versioned document Rego sees;
:func:`read_rego_value` turns the query's value into allow/deny.

Trust: levels are ordered low < medium < high; the *effective* trust of a
caller is ``min(granted, consented)``, and a rule's ``requiredTrust`` must not
exceed it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Final

from extproc.api import Principal
from extproc.config.models import MCPToolPolicy, ToolRule, Trust

REGO_INPUT_VERSION: Final = "v1"


@dataclass(frozen=True)
class Decision:
    """The outcome for one (principal, tool, arguments).

    Attributes:
        allowed: True to let the call through.
        reason: machine reason for metrics (``rule_deny``, ``insufficient_trust``,
            ``insufficient_scope``, ``rego``, ``policy_backend``…).
        explanation: the rule or Rego result that decided, for the audit line.
        missing_scopes: scopes a rule requires that the token lacks (403).
        message: the JSON-RPC error message the caller sees when denied.
    """

    allowed: bool
    reason: str = ""
    explanation: str = ""
    missing_scopes: tuple[str, ...] = ()
    message: str = ""
    required: Trust = Trust.LOW
    checks: tuple[str, ...] = field(default=())


def trust_level(value: str) -> Trust:
    """A trust level as a principal carries it; an unreadable one counts as low."""
    try:
        return Trust(value)
    except ValueError:
        return Trust.LOW


def effective_trust(principal: Principal) -> Trust:
    """``min(granted, consented)``; an unreadable level counts as low."""
    return min(trust_level(principal.granted), trust_level(principal.consented), key=lambda t: t.rank)


def first_rule(rules: Sequence[ToolRule], tool: str) -> tuple[int, ToolRule] | None:
    """The first of ``rules`` whose globs match ``tool``, with its index."""
    for index, rule in enumerate(rules):
        if any(fnmatchcase(tool, glob) for glob in rule.tools):
            return index, rule
    return None


def matching_rule(policy: MCPToolPolicy, tool: str) -> tuple[int, ToolRule] | None:
    """The first rule of ``policy`` whose globs match ``tool``, with its index."""
    return first_rule(policy.spec.rules, tool)


def check_rules(policies: Sequence[MCPToolPolicy], principal: Principal, tool: str) -> Decision:
    """Apply every policy's first matching rule; the first refusal wins.

    A tool no rule matches is left to Rego (and to the allow-list).
    """
    effective = effective_trust(principal)
    required = Trust.LOW
    checks: list[str] = []
    for policy in policies:
        found = matching_rule(policy, tool)
        if found is None:
            continue
        index, rule = found
        where = f"MCPToolPolicy {policy.name!r} rules[{index}]"
        if rule.action == "Deny":
            return Decision(
                False,
                "rule_deny",
                f"{where}: denies {tool!r}",
                message=f"tool {tool!r} is denied by policy {policy.name!r}",
            )
        if rule.required_trust.rank > required.rank:
            required = rule.required_trust
        if effective.rank < rule.required_trust.rank:
            return Decision(
                False,
                "insufficient_trust",
                f"{where}: requires trust {rule.required_trust.value}; effective {effective.value} "
                f"(granted {principal.granted}, consented {principal.consented})",
                message=f"tool {tool!r} requires trust {rule.required_trust.value}; the caller has {effective.value}",
                required=required,
            )
        missing = tuple(sorted(set(rule.scopes) - principal.scopes))
        if missing:
            return Decision(
                False,
                "insufficient_scope",
                f"{where}: requires scopes {list(rule.scopes)}; missing {list(missing)}",
                missing_scopes=missing,
                message=f"tool {tool!r} requires scope(s) {' '.join(missing)}",
                required=required,
            )
        checks.append(f"{where}: allows {tool!r} (trust {effective.value} >= {rule.required_trust.value})")
    return Decision(True, "", "; ".join(checks), required=required, checks=tuple(checks))


def rego_input(
    *,
    principal: Principal,
    server: str,
    tool: str,
    arguments: Mapping[str, Any] | None,
    annotations: Mapping[str, Any] | None,
    required: Trust,
    policy: str,
    listing: bool,
    virtual: str | None = None,
    standing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Rego input document, version ``v1`` (documented in the README).

    ``virtual``: the virtual server the agent called, when it reached ``server`` through one.
    ``standing``: what the caller's grants and consents give (``Standing.audit()``), if any apply.
    """
    return {
        "version": REGO_INPUT_VERSION,
        "principal": {
            "subject": principal.subject,
            "issuer": principal.issuer or None,
            "claims": dict(principal.claims),
            "scopes": sorted(principal.scopes),
            "anonymous": principal.anonymous,
        },
        "agent": principal.agent,
        "server": server,
        "virtual_server": virtual,
        "method": "tools/call",
        "tool": tool,
        "arguments": dict(arguments) if arguments is not None else {},
        "annotations": dict(annotations) if annotations is not None else None,
        "trust": {
            "granted": principal.granted,
            "consented": principal.consented,
            "effective": effective_trust(principal).value,
            "required": required.value,
            "ceiling": standing["ceiling"] if standing is not None else principal.granted,
            "grant": standing["grant"] if standing is not None else None,
            "consent": standing["consent"] if standing is not None else None,
        },
        "listing": listing,
        "policy": policy,
    }


def read_rego_value(value: Any) -> tuple[bool, str]:
    """Allow or deny from the query's value, and the reason Rego gave (if any).

    ``true`` allows; ``false``, undefined (``None``) or anything else denies;
    an object ``{"allow": bool, "reason": str}`` decides with a reason.
    """
    if value is True:
        return True, ""
    if isinstance(value, Mapping):
        reason = value.get("reason")
        return value.get("allow") is True, reason if isinstance(reason, str) else ""
    return False, "undefined" if value is None else ""
