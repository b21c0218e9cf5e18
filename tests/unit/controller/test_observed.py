"""What the extension servers reported, as MCPServer status.tools[] and MCPVirtualServer status.backends[]."""

from __future__ import annotations

from typing import Any

from controller.render.observed import Report, first_use_pins, parse_report, server_tools, virtual_backends
from controller.render.view import build_view
from extproc.config.models import MCPServer, MCPVirtualServer
from tests.kubedocs import NS, server

A, B, C = ("sha256:" + c * 64 for c in "abc")
NOW = "2026-12-03T12:00:00+00:00"


def model(doc: dict[str, Any]) -> MCPServer:
    return MCPServer.model_validate({**doc, "metadata": {"name": doc["metadata"]["name"]}})


def report(tools: dict[str, dict[str, Any]], *, complete: bool = True, name: str = "tools") -> Report:
    parsed = parse_report(
        {"version": 1, "stages": {"pins": {"servers": {name: {"complete": complete, "tools": tools}}}}}, "t"
    )
    assert parsed is not None
    return parsed


def first_use(digest: str, at: str = "2026-12-03T10:00:00+00:00", seen: str | None = None) -> dict[str, Any]:
    return {"pinned": digest, "source": "first-use", "pinnedAt": at, "seen": seen or digest, "seenAt": None}


TOOLS = model(server("tools", "http://tools.mcp.svc:8080/mcp"))


def test_first_use_pins_are_taken_from_a_whole_listing_the_earliest_winning() -> None:
    early = report({"echo": first_use(A, "2026-12-03T09:00:00+00:00")})
    late = report({"echo": first_use(B, "2026-12-03T11:00:00+00:00")})
    [echo] = server_tools(TOOLS, {}, None, [late, early], NOW) or []
    assert echo["digest"] == A and echo["source"] == "first-use" and echo["firstSeen"] == "2026-12-03T09:00:00+00:00"
    # The other pod saw B unlike the namespace's pin: changed.
    assert echo["changed"] is True and echo["current"] == B
    partial = report({"echo": first_use(A)}, complete=False)
    [echo] = server_tools(TOOLS, {}, None, [partial], NOW) or []
    assert "digest" not in echo  # a pod that saw one page of many pins nothing for the namespace


def test_a_pin_in_the_status_outlives_every_report_and_wins_over_a_new_first_use() -> None:
    status = {"tools": [{"name": "echo", "digest": A, "source": "first-use", "firstSeen": "t0", "changed": False}]}
    # A restarted pod that (wrongly) trusted what it saw first: the status's pin stands.
    [echo] = server_tools(TOOLS, {}, status, [report({"echo": first_use(B)})], NOW) or []
    assert (echo["digest"], echo["firstSeen"], echo["changed"], echo["current"]) == (A, "t0", True, B)
    # No pod answers: the status is kept as it was.
    assert server_tools(TOOLS, {}, status, [], NOW) == status["tools"]


def test_a_change_reported_and_then_approved_through_pinned_tools() -> None:
    status = {"tools": [{"name": "echo", "digest": A, "source": "first-use", "firstSeen": "t0"}]}
    changed = {"pinned": A, "source": "declared", "seen": B, "seenAt": "t1", "changes": ["description"]}
    [echo] = server_tools(TOOLS, {}, status, [report({"echo": changed})], NOW) or []
    assert echo == {
        "name": "echo",
        "digest": A,
        "source": "first-use",
        "firstSeen": "t0",
        "changed": True,
        "current": B,
        "changes": ["description"],
    }
    # The operator writes current into spec.pinnedTools: declared, as pinned, even before a pod reports it.
    [echo] = server_tools(TOOLS, {"echo": B}, {"tools": [echo]}, [], NOW) or []
    assert (echo["digest"], echo["source"], echo["changed"]) == (B, "declared", False)
    assert "current" not in echo


def test_a_tool_that_appeared_after_pinning_has_no_pin_and_is_changed() -> None:
    late = {"pinned": None, "source": None, "seen": C, "seenAt": "t2"}
    tools = server_tools(TOOLS, {"echo": A}, None, [report({"echo": {"pinned": A, "seen": A}, "late": late})], NOW)
    assert tools is not None
    by_name = {t["name"]: t for t in tools}
    assert by_name["echo"]["changed"] is False and by_name["echo"]["source"] == "declared"
    assert by_name["late"] == {"name": "late", "firstSeen": "t2", "changed": True, "current": C}


def test_pinning_off_writes_no_tools_and_status_pins_reach_only_pinned_servers() -> None:
    off = model(server("tools", "http://tools.mcp.svc:8080/mcp", toolPinning="Off"))
    assert server_tools(off, {}, None, [report({"echo": first_use(A)})], NOW) is None
    status = {
        "tools": [
            {"name": "echo", "digest": A, "source": "first-use"},
            {"name": "add", "digest": B, "source": "declared"},
        ]
    }
    assert first_use_pins(status) == {"echo": A}
    assert first_use_pins({"tools": [{"name": "x", "digest": "sha256:nothex", "source": "first-use"}]}) == {}
    observed = {**server("tools", "http://tools.mcp.svc:8080/mcp", pinnedTools={"add": C}), "status": status}
    view = build_view(NS, [observed])
    assert dict(view.catalog.servers["tools"].spec.pinned_tools) == {"echo": A, "add": C}  # the spec's own win
    off_doc = {**server("tools", "http://tools.mcp.svc:8080/mcp", toolPinning="Off"), "status": status}
    assert dict(build_view(NS, [off_doc]).catalog.servers["tools"].spec.pinned_tools) == {}


def test_malformed_reports_are_left_out_whole() -> None:
    assert parse_report({"version": 2, "stages": {}}, "pod x") is None
    assert (
        parse_report({"version": 1, "stages": {"pins": {"servers": {"s": {"tools": {"t": {"pinned": "md5:x"}}}}}}}, "x")
        is None
    )
    assert parse_report("nonsense", "pod x") is None
    assert parse_report({"version": 1, "stages": {"other-stage": {"anything": 1}}}, "x") is not None


def test_virtual_backends_count_tools_and_name_conflicts() -> None:
    virtual = MCPVirtualServer.model_validate(
        {
            "apiVersion": "mcp.extproc.io/v1alpha1",
            "kind": "MCPVirtualServer",
            "metadata": {"name": "all"},
            "spec": {"servers": [{"name": "github", "prefix": "gh_"}, {"name": "wiki"}, {"name": "docs"}]},
        }
    )
    body = {
        "version": 1,
        "stages": {
            "virtual": {
                "virtualServers": {
                    "all": {
                        "backends": {"github": {"tools": 3}, "wiki": {"tools": 2}, "docs": {"tools": 1}},
                        "conflicts": {"search": ["wiki", "docs"]},
                    }
                }
            }
        },
    }
    parsed = parse_report(body, "x")
    assert parsed is not None
    backends = virtual_backends(virtual, None, [parsed])
    assert backends == [
        {"name": "github", "prefix": "gh_", "tools": 3, "conflicts": []},
        {"name": "wiki", "tools": 2, "conflicts": ["search"]},
        {"name": "docs", "tools": 1, "conflicts": ["search"]},
    ]
    assert virtual_backends(virtual, {"backends": backends}, []) == backends  # nobody answered: kept


def test_a_status_settles_and_tools_go_when_pinning_is_turned_off(api: Any, kube: Any) -> None:
    """No pass rewrites an unchanged status (no watch-event loop), and toolPinning Off deletes tools[]."""
    from controller.render.meta import ControllerSettings
    from controller.runtime.reconcile import Reconciler

    collection = "mcp.extproc.io/v1alpha1/mcpservers"
    doc = server("tools", "http://tools.mcp.svc:8080/mcp")
    api.put(collection, {**doc, "metadata": {"name": "tools", "namespace": NS}})
    reconciler = Reconciler(kube, ControllerSettings(namespace="mcp-system"))
    reconciler.reconcile(NS)
    assert api.get(collection, NS, "tools")["status"]["tools"] == []
    writes = len([r for r in api.state.requests if r.path.endswith("/status")])
    reconciler.reconcile(NS)
    assert len([r for r in api.state.requests if r.path.endswith("/status")]) == writes
    off = server("tools", "http://tools.mcp.svc:8080/mcp", toolPinning="Off")
    api.put(collection, {**off, "metadata": {"name": "tools", "namespace": NS}})
    reconciler.reconcile(NS)
    assert api.get(collection, NS, "tools")["status"].get("tools") is None
    writes = len([r for r in api.state.requests if r.path.endswith("/status")])
    reconciler.reconcile(NS)
    assert len([r for r in api.state.requests if r.path.endswith("/status")]) == writes


def test_collect_asks_running_extension_servers_and_leaves_out_the_silent_and_the_malformed(
    api: Any, kube: Any
) -> None:
    import base64
    import json

    import httpx

    from controller.render.meta import ControllerSettings
    from controller.runtime.reports import collect
    from extproc.config.session_keys import new_key_set, parse_key_set
    from extproc.core.report import verify_token

    key_set = new_key_set()
    data = {"jwks.json": base64.b64encode(json.dumps(key_set).encode()).decode()}
    api.put(
        "v1/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mcp-extproc-session-keys", "namespace": NS},
            "data": data,
        },
    )

    def pod(name: str, ip: str, *, phase: str = "Running", **meta: Any) -> None:
        api.put(
            "v1/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, **meta},
                "status": {"phase": phase, "podIP": ip},
            },
        )

    injected: dict[str, Any] = {"annotations": {"mcp.extproc.io/injected": "assistant"}}
    pod("good", "10.0.0.1", **injected)
    pod("silent", "10.0.0.2", **injected)
    pod("garbled", "10.0.0.3", **injected)
    pod("shared", "10.0.0.4", labels={"app.kubernetes.io/name": "mcp-extproc"})
    pod("pending", "10.0.0.5", phase="Pending", **injected)
    pod("someone-else", "10.0.0.6")
    asked: list[str] = []
    good = {"version": 1, "stages": {"pins": {"servers": {"tools": {"complete": True, "tools": {}}}}}}

    def fetch(url: str, token: str) -> Any:
        verify_token(parse_key_set(key_set, "t"), token)  # signed with the namespace's key set
        asked.append(url)
        if "10.0.0.2" in url:
            raise httpx.ConnectTimeout("no answer")
        return {"version": 1, "stages": "nonsense"} if "10.0.0.3" in url else good

    reports = collect(kube, NS, ControllerSettings(report_port=9465), fetch)
    assert len(reports) == 2  # good and shared
    assert sorted(asked) == [f"http://10.0.0.{i}:9465/report" for i in (1, 2, 3, 4)]
