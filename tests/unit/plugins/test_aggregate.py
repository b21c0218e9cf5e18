"""A virtual server's names (``plugins.lib.aggregate``): prefixes out, owners in, merged lists, request ids.

(The stage that uses them, through real servers: tests/integration/test_virtual_server.py.)
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from extproc.config.models import MCPVirtualServer, VirtualBackend
from plugins.lib.aggregate import (
    Conflict,
    Names,
    Owner,
    list_names,
    matches,
    merge,
    outward,
    union_capabilities,
    unwrap_id,
    wrap_id,
)

API = "mcp.extproc.io/v1alpha1"
TEMPLATE = "demo://resource/dynamic/text/{id}"


def virtual(*servers: dict[str, str], name: str = "tools") -> MCPVirtualServer:
    doc = {"apiVersion": API, "kind": "MCPVirtualServer", "metadata": {"name": name}, "spec": {"servers": servers}}
    return MCPVirtualServer.model_validate(doc)


def backend(v: MCPVirtualServer, name: str) -> VirtualBackend:
    found = v.backend(name)
    assert found is not None
    return found


GH = VirtualBackend(name="github", prefix="github_")
PLAIN = VirtualBackend(name="local")


# -- outward ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "inner", "expected"),
    [
        ("tools/list", "search", "github_search"),
        ("prompts/list", "review", "github_review"),
        ("resources/list", "file:///a", "github+file:///a"),
        ("resources/templates/list", "db://{table}", "github+db://{table}"),
    ],
)
def test_a_prefixed_backend_s_names_go_out_with_its_prefix(kind: str, inner: str, expected: str) -> None:
    assert outward(GH, kind, inner) == expected


@pytest.mark.parametrize("kind", ["tools/list", "prompts/list", "resources/list", "resources/templates/list"])
def test_an_unprefixed_backend_s_names_go_out_unchanged(kind: str) -> None:
    for name in ("search", "file:///a", "db://{table}", "github_search"):
        assert outward(PLAIN, kind, name) == name


# -- owners -------------------------------------------------------------------------------------


def test_a_prefixed_name_belongs_to_its_prefix_s_backend_with_the_prefix_removed() -> None:
    v = virtual({"name": "github", "prefix": "github_"}, {"name": "local"})
    names = Names(v)
    names.learn("github", "tools/list", ["search", "open"])
    names.learn("local", "tools/list", ["echo"])
    assert names.owners("tools/list", "github_search") == [Owner(backend(v, "github"), "search")]
    assert names.owners("tools/list", "github_open") == [Owner(backend(v, "github"), "open")]
    # Prompts use the same prefix.
    names.learn("github", "prompts/list", ["review"])
    assert names.owners("prompts/list", "github_review") == [Owner(backend(v, "github"), "review")]


def test_an_unprefixed_name_belongs_to_the_backend_that_listed_it() -> None:
    v = virtual({"name": "github", "prefix": "github_"}, {"name": "local"})
    names = Names(v)
    names.learn("github", "tools/list", ["search"])
    names.learn("local", "tools/list", ["echo", "add"])
    assert names.owners("tools/list", "echo") == [Owner(backend(v, "local"), "echo")]
    assert names.owners("tools/list", "add") == [Owner(backend(v, "local"), "add")]
    # The prefixed backend's inner name is not reachable without its prefix.
    assert names.owners("tools/list", "search") == []


def test_unknown_names_have_no_owner() -> None:
    v = virtual({"name": "github", "prefix": "github_"}, {"name": "local"})
    names = Names(v)
    names.learn("github", "tools/list", ["search"])
    names.learn("local", "tools/list", ["echo"])
    assert names.owners("tools/list", "nope") == []
    assert names.owners("tools/list", "github_nope") == []  # the prefix's backend listed no such tool
    assert names.owners("tools/list", "github") == []  # not even the prefix itself
    assert names.owners("prompts/list", "echo") == []  # listed as a tool, not as a prompt


def test_before_any_list_a_prefixed_name_goes_to_its_backend_and_an_unprefixed_one_nowhere() -> None:
    v = virtual({"name": "github", "prefix": "github_"}, {"name": "local"})
    names = Names(v)
    assert names.known("github", "tools/list") is None
    assert names.owners("tools/list", "github_search") == [Owner(backend(v, "github"), "search")]
    assert names.owners("tools/list", "echo") == []


def test_resource_uris_by_server_name_and_by_what_an_unprefixed_backend_listed() -> None:
    v = virtual({"name": "github", "prefix": "github_"}, {"name": "local"})
    names = Names(v)
    names.learn("github", "resources/list", ["file:///listed"])
    names.learn("local", "resources/list", ["file:///mine"])
    names.learn("local", "resources/templates/list", [TEMPLATE])
    gh, local = backend(v, "github"), backend(v, "local")
    # A prefixed backend's URIs start with its name and "+"; even one it did not list
    # (a template may produce it) goes to it.
    assert names.owners("resources/list", "github+file:///listed") == [Owner(gh, "file:///listed")]
    assert names.owners("resources/list", "github+file:///other") == [Owner(gh, "file:///other")]
    assert names.owners("resources/list", "github_file:///listed") == []  # the tool prefix is not the URI's
    assert names.owners("resources/list", "file:///mine") == [Owner(local, "file:///mine")]
    assert names.owners("resources/list", "demo://resource/dynamic/text/5") == [
        Owner(local, "demo://resource/dynamic/text/5")
    ]
    assert names.owners("resources/list", "demo://resource/dynamic/text/5/x") == []
    assert names.owners("resources/list", "file:///nobody") == []


# -- conflicts and merge ------------------------------------------------------------------------


def test_a_name_two_unprefixed_backends_list_is_a_conflict_with_two_owners() -> None:
    v = virtual({"name": "a"}, {"name": "b"})
    names = Names(v)
    names.learn("a", "tools/list", ["echo", "add"])
    names.learn("b", "tools/list", ["echo", "sub"])
    assert names.conflicts("tools/list") == {"echo": Conflict(("a", "b"))}
    assert [o.backend.name for o in names.owners("tools/list", "echo")] == ["a", "b"]
    message = names.conflicts("tools/list")["echo"].message("echo", v.name)
    assert "'echo'" in message
    assert "'tools'" in message
    assert "'a' and 'b'" in message
    assert "prefix" in message


def test_a_prefixed_name_equal_to_an_unprefixed_backend_s_name_is_a_conflict() -> None:
    v = virtual({"name": "a", "prefix": "a_"}, {"name": "b"})
    names = Names(v)
    names.learn("a", "tools/list", ["x"])
    names.learn("b", "tools/list", ["a_x", "y"])
    assert names.conflicts("tools/list") == {"a_x": Conflict(("a", "b"))}
    assert len(names.owners("tools/list", "a_x")) == 2


def test_prefixes_keep_the_same_inner_name_apart() -> None:
    v = virtual({"name": "a", "prefix": "a_"}, {"name": "b", "prefix": "b_"})
    names = Names(v)
    names.learn("a", "tools/list", ["echo"])
    names.learn("b", "tools/list", ["echo"])
    assert names.conflicts("tools/list") == {}


def _tools(*names: str) -> dict[str, Any]:
    return {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names]}


def test_merge_leaves_out_and_reports_a_conflicting_name_and_keeps_the_rest_in_backend_order() -> None:
    v = virtual({"name": "a"}, {"name": "b"}, {"name": "c", "prefix": "c_"})
    names = Names(v)
    answers = [
        (backend(v, "a"), _tools("echo", "add")),
        (backend(v, "b"), _tools("sub", "echo")),
        (backend(v, "c"), _tools("echo", "mul")),
    ]
    for entry, result in answers:
        names.learn(entry.name, "tools/list", list_names("tools/list", result))
    merged, conflicts = merge("tools/list", names, answers)
    assert [t["name"] for t in merged["tools"]] == ["add", "sub", "c_echo", "c_mul"]
    assert conflicts == {"echo": Conflict(("a", "b"))}


def test_merge_changes_nothing_but_the_name_of_each_item() -> None:
    v = virtual({"name": "a", "prefix": "a_"}, {"name": "b"})
    names = Names(v)
    rich = {
        "name": "search",
        "title": "Search the code",
        "description": "Full text search",
        "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        "outputSchema": {"type": "object", "properties": {"hits": {"type": "array"}}},
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
        "icons": [{"src": "https://a.test/icon.png", "mimeType": "image/png", "sizes": ["48x48"]}],
        "_meta": {"example.test/owner": "team-a"},
    }
    bare = {"name": "ping", "inputSchema": {}}
    answers = [(backend(v, "a"), {"tools": [rich]}), (backend(v, "b"), {"tools": [bare]})]
    before = copy.deepcopy(answers)
    for entry, result in answers:
        names.learn(entry.name, "tools/list", list_names("tools/list", result))
    merged, conflicts = merge("tools/list", names, answers)
    assert conflicts == {}
    assert merged == {"tools": [{**rich, "name": "a_search"}, bare]}
    assert merged["tools"][1]["inputSchema"] == {}  # an empty schema stays empty, not dropped or filled in
    assert answers == before  # the backends' results are left as they were


def test_merge_prefixes_only_the_uri_of_a_resource() -> None:
    v = virtual({"name": "a", "prefix": "a_"}, {"name": "b"})
    names = Names(v)
    resource = {"uri": "file:///notes.txt", "name": "notes", "mimeType": "text/plain", "size": 12}
    template = {"uriTemplate": TEMPLATE, "name": "text", "mimeType": "text/plain"}
    merged, _ = merge("resources/list", names, [(backend(v, "a"), {"resources": [resource]})])
    assert merged == {"resources": [{**resource, "uri": "a+file:///notes.txt"}]}
    merged, _ = merge("resources/templates/list", names, [(backend(v, "a"), {"resourceTemplates": [template]})])
    assert merged == {"resourceTemplates": [{**template, "uriTemplate": f"a+{TEMPLATE}"}]}


def test_merge_skips_what_is_not_an_item_and_a_backend_without_a_list() -> None:
    v = virtual({"name": "a"}, {"name": "b"})
    names = Names(v)
    answers = [
        (backend(v, "a"), {"tools": [{"name": "ok"}, {"name": 5}, "junk", {"title": "no name"}]}),
        (backend(v, "b"), {"tools": "not a list"}),
    ]
    merged, _ = merge("tools/list", names, answers)
    assert merged == {"tools": [{"name": "ok"}]}
    assert list_names("tools/list", answers[0][1]) == ["ok"]
    assert list_names("tools/list", None) == []


# -- capabilities -------------------------------------------------------------------------------


def test_capabilities_are_merged_key_by_key_and_flags_are_or_ed() -> None:
    first = {"tools": {"listChanged": False}, "logging": {}}
    second = {"tools": {"listChanged": True}, "prompts": {}}
    assert union_capabilities([first, second]) == {"tools": {"listChanged": True}, "logging": {}, "prompts": {}}
    assert union_capabilities([second, first]) == {"tools": {"listChanged": True}, "prompts": {}, "logging": {}}
    assert first == {"tools": {"listChanged": False}, "logging": {}}  # inputs untouched


def test_capabilities_nested_deeper_and_false_everywhere_stays_false() -> None:
    a = {"resources": {"subscribe": False, "listChanged": False}, "experimental": {"x": {"level": 1}}}
    b = {"resources": {"subscribe": True}, "experimental": {"y": {"on": True}}}
    c = {"resources": {"listChanged": False}}
    assert union_capabilities([a, b, c]) == {
        "resources": {"subscribe": True, "listChanged": False},
        "experimental": {"x": {"level": 1}, "y": {"on": True}},
    }


def test_capabilities_skip_what_is_not_a_mapping() -> None:
    assert union_capabilities([None, "x", {"tools": {}}]) == {"tools": {}}
    assert union_capabilities([]) == {}


# -- request ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [0, 7, -3, 2**53 + 1, "abc", "", "a~b", "~", "mcpx~x~1", '"quoted"'])
def test_a_wrapped_id_unwraps_to_its_backend_and_id(request_id: int | str) -> None:
    wrapped = wrap_id("github", request_id)
    assert isinstance(wrapped, str)
    assert wrapped != request_id
    assert unwrap_id(wrapped) == ("github", request_id)
    # Keeps the type: the server gets back 7, not "7".
    unwrapped = unwrap_id(wrapped)
    assert unwrapped is not None
    assert type(unwrapped[1]) is type(request_id)


def test_ids_of_different_backends_stay_apart() -> None:
    assert wrap_id("a", 1) != wrap_id("b", 1)
    assert wrap_id("a", 1) != wrap_id("a", "1")


@pytest.mark.parametrize(
    "value",
    [
        7,
        "7",
        "abc",
        None,
        True,
        1.5,
        ["mcpx~a~1"],
        {"id": "mcpx~a~1"},
        "mcpx~",
        "mcpx~a",
        "mcpx~a~",
        "mcpx~~1",
        "mcpx~a~not json",
        'mcpx~a~"unterminated',
        "mcpx~a~true",
        "mcpx~a~null",
        "mcpx~a~1.5",
        "mcpx~a~1e400",
        "mcpx~a~NaN",
        'mcpx~a~{"k":1}',
        "mcpx~a~[1]",
        "MCPX~a~1",
        "xmcpx~a~1",
    ],
)
def test_anything_wrap_id_did_not_make_unwraps_to_none(value: Any) -> None:
    assert unwrap_id(value) is None


def test_a_deeply_nested_id_unwraps_to_none_instead_of_raising() -> None:
    # An agent controls the ids it answers with; no id may make the stage fail.
    assert unwrap_id("mcpx~a~" + "[" * 100_000) is None


# -- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "uri", "expected"),
    [
        (TEMPLATE, "demo://resource/dynamic/text/5", True),
        (TEMPLATE, "demo://resource/dynamic/text/abc-def", True),
        (TEMPLATE, "demo://resource/dynamic/text/5/x", False),
        (TEMPLATE, "demo://resource/dynamic/blob/5", False),
        (TEMPLATE, "xdemo://resource/dynamic/text/5", False),
        ("file:///{+path}", "file:///a/b/c.txt", True),
        ("file:///{+path}", "file:///", True),
        ("file:///{path}", "file:///a/b/c.txt", False),
        ("db://{schema}/{table}", "db://public/users", True),
        ("db://{schema}/{table}", "db://public", False),
        ("db://x.y/{t}", "db://xzy/t", False),  # literals are literal, "." included
        ("plain://no/expressions", "plain://no/expressions", True),
        ("plain://no/expressions", "plain://no/expressions/", False),
    ],
)
def test_uri_templates_match_the_uris_they_can_produce(template: str, uri: str, expected: bool) -> None:
    assert matches(template, uri) is expected


def test_a_listen_acknowledgement_of_any_shape_is_read_without_failing() -> None:
    from plugins.virtual import _acknowledged, _honor

    ack = "notifications/subscriptions/acknowledged"
    for note in (None, {"method": ack}, {"method": ack, "params": None}, {"method": ack, "params": [1]}):
        assert _acknowledged(note) is None
    honored: dict[str, Any] = {}
    entry = VirtualBackend(name="a", prefix="a_")
    _honor(honored, entry, _acknowledged({"method": ack, "params": {"notifications": ["not", "an", "object"]}}))
    assert honored == {}
    part = {"toolsListChanged": True, "resourceSubscriptions": ["file:///x"]}
    _honor(honored, entry, _acknowledged({"method": ack, "params": {"notifications": part}}))
    assert honored == {"toolsListChanged": True, "resourceSubscriptions": ["a+file:///x"]}


async def test_the_virtual_stage_reports_each_backends_tool_count_and_the_conflicts() -> None:
    from plugins.virtual import VirtualConfig, VirtualStage

    stage = VirtualStage(VirtualConfig())
    try:
        tools = virtual({"name": "github", "prefix": "gh_"}, {"name": "wiki"}, {"name": "docs"})
        names = stage._names(tools)
        names.learn("github", "tools/list", ["search", "issue"])
        names.learn("wiki", "tools/list", ["search", "page"])
        names.learn("docs", "tools/list", ["search"])
        assert stage.report() == {
            "virtualServers": {
                "tools": {
                    "backends": {"github": {"tools": 2}, "wiki": {"tools": 2}, "docs": {"tools": 1}},
                    "conflicts": {"search": ["wiki", "docs"]},  # gh_search is github's own
                }
            }
        }
    finally:
        await stage.shutdown()
