"""Can the pipeline enforce the resources? And would a reload lower what is enforced?

Pure functions, no I/O. Data flow::

    Catalog + [(stage name, failure mode), …] ──posture_problems──▶ [problem, …]
        used by extproc.commands.inspect.checked (check, up, serve, render envoy: refused,
        exit 2) and by extproc.core.reload.try_reload (the reload is refused)

    Catalog in force + new Catalog ──weakening──▶ [problem, …]   (extproc.core.reload only)

What each kind of resource needs, by the built-in stages' names (a third-party stage of
another name does not stand in for them), each with ``failureMode: closed``:

    MCPAgent                 authn        else every request is served unauthenticated
    MCPServer (always one)   allowlist    else allowedTools/deniedTools are not enforced,
                             mcp closed   (allowlist reads what mcp parses)
    MCPToolPolicy            policy       else its rules are not enforced
    spec.upstreamAuth        credentials  else the upstream credential is not injected, and
                                          the agent's own Authorization may reach the server
    toolPinning: Enforce     pins         else changed tool definitions reach the agent

``failureMode: open`` on one of these would skip it on a fault, i.e. let the request
through unchecked. That ``allowlist`` and ``policy`` come after ``mcp`` is the
registry's ``requires`` check.

A reload never switches authentication off (MCPAgents in force, none in the new file)
nor leaves the policy stage nothing to enforce (MCPToolPolicies in force, none in the new
file): doing that on purpose takes a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from extproc.config.models import ToolPinning
from extproc.config.pipeline_file import FailureMode
from extproc.config.resources import Catalog

__all__ = ["StagePosture", "posture_problems", "weakening"]

StagePosture = tuple[str, FailureMode]
"""One pipeline entry as far as the posture goes: the stage's name and its failure mode."""

_SHOWN: Final = 3
"""How many resource names a message lists before ``and N more``."""

_WHERE_TO_ADD: Final = {
    "authn": "add authn before mcp",
    "allowlist": "add allowlist after mcp",
    "policy": "add policy after allowlist",
    "credentials": "add credentials after policy",
    "pins": "add pins after policy",
}
"""Where each stage goes, as in the default pipeline (authn, mcp, allowlist, policy, pins, credentials, session)."""

_RESTART: Final = "a reload never lowers the security posture: restart with the new file to do this on purpose"


def _named(kind: str, names: Iterable[str], kinds: str = "") -> tuple[str, bool]:
    """``MCPAgent 'a'`` or ``MCPAgents 'a', 'b' and 2 more`` (``kinds``: the plural), and whether plural."""
    ordered = sorted(names)
    shown = ", ".join(repr(n) for n in ordered[:_SHOWN])
    more = f" and {len(ordered) - _SHOWN} more" if len(ordered) > _SHOWN else ""
    plural = len(ordered) > 1
    return f"{(kinds or kind + 's') if plural else kind} {shown}{more}", plural


def _verb(plural: bool, singular: str, plural_form: str) -> str:
    return plural_form if plural else singular


def _from(catalog: Catalog) -> str:
    return f" ({', '.join(catalog.sources)})" if catalog.sources else ""


def posture_problems(catalog: Catalog, stages: Sequence[StagePosture], *, pipeline: str = "the pipeline") -> list[str]:
    """What ``stages`` could not enforce of ``catalog``; empty when the pipeline can enforce it all.

    Args:
        catalog: the resources the pipeline would serve.
        stages: the pipeline's entries, in order: (stage name, failure mode).
        pipeline: how messages call the pipeline ("the pipeline", "the running pipeline").

    Returns:
        One message per problem, naming the stage, the resource and its file, what would go
        unenforced and what to change.
    """
    modes: dict[str, FailureMode] = {}
    for name, failure_mode in stages:
        modes.setdefault(name, failure_mode)
    source = _from(catalog)
    needs: list[tuple[str, str, str, str]] = []  # (stage, resources, what they declare, what would happen)
    if catalog.agents:
        agents, plural = _named("MCPAgent", catalog.agents)
        declares = _verb(plural, "declares an identity", "declare identities")
        needs.append(("authn", agents, declares, "requests would be served unauthenticated"))
    if catalog.servers:
        servers, plural = _named("MCPServer", catalog.servers)
        declares = _verb(plural, "declares", "declare") + " allowedTools/deniedTools"
        needs.append(("allowlist", servers, declares, "every tool would be callable"))
    if catalog.policies:
        policies, plural = _named("MCPToolPolicy", catalog.policies, "MCPToolPolicies")
        declares = _verb(plural, "declares", "declare") + " tool rules"
        needs.append(("policy", policies, declares, "the rules would not be enforced"))
    if catalog.grants:
        grants, plural = _named("MCPAccessGrant", catalog.grants)
        declares = _verb(plural, "grants trust to its subject", "grant trust to their subjects")
        needs.append(("policy", grants, declares, "the grants would not limit anyone"))
    if catalog.consents:
        consents, plural = _named("MCPConsent", catalog.consents)
        declares = _verb(plural, "records", "record") + " consent"
        needs.append(("policy", consents, declares, "lowered, revoked and expired consents would be ignored"))
    upstream = [n for n, s in catalog.servers.items() if s.spec.upstream_auth is not None]
    if upstream:
        servers, plural = _named("MCPServer", upstream)
        declares = _verb(plural, "declares", "declare") + " spec.upstreamAuth"
        happens = "requests would reach the server without that credential, and with the agent's own Authorization"
        needs.append(("credentials", servers, declares, happens))
    enforced = [n for n, s in catalog.servers.items() if s.spec.tool_pinning is ToolPinning.ENFORCE]
    if enforced:
        servers, plural = _named("MCPServer", enforced)
        declares = _verb(plural, "declares", "declare") + " toolPinning: Enforce"
        needs.append(("pins", servers, declares, "tools whose definitions changed would be listed and callable"))
    problems: list[str] = []
    for stage, resources, declares, happens in needs:
        mode = modes.get(stage)
        if mode is None:
            problems.append(
                f"{pipeline} has no {stage!r} stage, but {resources}{source} {declares}: {happens}; "
                f"{_WHERE_TO_ADD[stage]}"
            )
        elif mode is FailureMode.OPEN:
            problems.append(
                f"stage {stage!r} has failureMode: open, but {resources}{source} {declares}: on a fault in "
                f"{stage} {happens}; set failureMode: closed (the default) on {stage}"
            )
    if modes.get("mcp") is FailureMode.OPEN and "allowlist" in modes:
        servers, plural = _named("MCPServer", catalog.servers)
        problems.append(
            f"stage 'mcp' has failureMode: open, but allowlist enforces what {servers}{source} "
            f"{_verb(plural, 'declares', 'declare')} on the calls mcp parses: on a fault in mcp a call would pass "
            "allowlist (and policy) unchecked; set failureMode: closed (the default) on mcp"
        )
    return problems


def weakening(in_force: Catalog, new: Catalog) -> list[str]:
    """What a reload from ``in_force`` to ``new`` would stop enforcing; empty when nothing.

    Only switching authentication off (MCPAgents in force, none in ``new``) and leaving
    the policy stage nothing to enforce (MCPToolPolicies in force, none in ``new``) count:
    changing or removing some of them is an ordinary reload.
    """
    problems: list[str] = []
    source = _from(new) or " (the new file)"
    if in_force.agents and not new.agents:
        agents, plural = _named("MCPAgent", in_force.agents)
        problems.append(
            f"the new resources{source} declare no MCPAgent, but {agents} {_verb(plural, 'is', 'are')} in force: "
            "authentication would be switched off and every caller served as anonymous (with the upstream "
            f"credentials injected for them); {_RESTART}"
        )
    if in_force.policies and not new.policies:
        policies, plural = _named("MCPToolPolicy", in_force.policies, "MCPToolPolicies")
        problems.append(
            f"the new resources{source} declare no MCPToolPolicy, but {policies} {_verb(plural, 'is', 'are')} in "
            f"force: the policy stage would have nothing left to enforce; {_RESTART}"
        )
    return problems
