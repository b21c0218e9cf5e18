"""``MCPVirtualServer`` documents: what `mcp-extproc check` accepts, and what it says when it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.resources import Catalog, load_resources, parse_documents, reference_problems
from extproc.errors import ConfigError

API = "mcp.extproc.io/v1alpha1"
LABEL = "resources.yaml: document 4 (MCPVirtualServer 'tools'): "


def server(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": f"http://{name}.test/mcp", **spec},
    }


def virtual(servers: list[dict[str, Any]], name: str = "tools") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MCPVirtualServer", "metadata": {"name": name}, "spec": {"servers": servers}}


def agent(name: str, refs: list[dict[str, str]]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MCPAgent", "metadata": {"name": name}, "spec": {"mcpServerRefs": refs}}


SERVERS = [server("a"), server("b"), server("c")]


def parse(*docs: dict[str, Any]) -> Catalog:
    return parse_documents([*SERVERS, *docs], "resources.yaml")


def test_a_valid_virtual_server_is_loaded_with_its_backends_in_order() -> None:
    catalog = parse(virtual([{"name": "b", "prefix": "b_"}, {"name": "a"}]))
    assert reference_problems(catalog) == []
    tools = catalog.virtual_servers["tools"]
    assert [(s.name, s.prefix) for s in tools.spec.servers] == [("b", "b_"), ("a", None)]
    assert catalog.virtual_for_path("/tools/mcp") is tools
    assert catalog.server_for_path("/tools/mcp") is None
    assert catalog.virtual_for_path("/a/mcp") is None


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        ([{"name": "a"}, {"name": "b"}, {"name": "a"}], "spec: Value error, server 'a' is listed twice"),
        (
            [{"name": "a", "prefix": "x_"}, {"name": "b", "prefix": "x_"}],
            "spec: Value error, prefix 'x_' is used twice",
        ),
        (
            [{"name": "a", "prefix": "gh_"}, {"name": "b", "prefix": "gh_x_"}],
            "spec: Value error, prefix 'gh_' starts prefix 'gh_x_': a name could belong to either server",
        ),
        (  # in either order
            [{"name": "a", "prefix": "gh_x_"}, {"name": "b", "prefix": "gh_"}],
            "spec: Value error, prefix 'gh_' starts prefix 'gh_x_'",
        ),
        ([{"name": "a", "prefix": "my tools"}], "spec.servers[0].prefix: String should match pattern"),
        ([{"name": "a"}, {"name": "b", "prefix": "gh/"}], "spec.servers[1].prefix: String should match pattern"),
        ([{"name": "a", "prefix": ""}], "spec.servers[0].prefix: String should match pattern"),
        ([{"name": "a", "prefix": "p" * 65}], "spec.servers[0].prefix: String should match pattern"),
        ([], "spec.servers: List should have at least 1 item"),
        ([{"prefix": "a_"}], "spec.servers[0].name: Field required"),
        ([{"name": "a", "prefx": "a_"}], "spec.servers[0].prefx: Extra inputs are not permitted"),
    ],
)
def test_a_bad_virtual_server_is_refused_naming_the_document_and_field(
    servers: list[dict[str, Any]], expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(virtual(servers))
    assert str(refused.value).startswith(LABEL + expected)


def test_prefixes_that_start_no_other_are_fine() -> None:
    catalog = parse(virtual([{"name": "a", "prefix": "gh_a"}, {"name": "b", "prefix": "gh_b"}, {"name": "c"}]))
    assert [s.prefix for s in catalog.virtual_servers["tools"].spec.servers] == ["gh_a", "gh_b", None]


def test_a_backend_that_is_no_mcp_server_is_a_reference_problem() -> None:
    catalog = parse(
        virtual([{"name": "a"}, {"name": "ghost"}]),
        virtual([{"name": "tools"}], name="outer"),  # a virtual server is not an MCPServer either
    )
    assert reference_problems(catalog) == [
        "MCPVirtualServer 'outer': spec.servers[0].name: no MCPServer named 'tools'",
        "MCPVirtualServer 'tools': spec.servers[1].name: no MCPServer named 'ghost'",
    ]


def test_a_virtual_server_named_like_an_mcp_server_is_a_reference_problem() -> None:
    catalog = parse(virtual([{"name": "b"}], name="a"))
    [problem] = reference_problems(catalog)
    assert problem.startswith("MCPVirtualServer 'a': metadata.name: an MCPServer has this name")
    assert "/a/mcp" in problem


def test_an_agent_s_reference_to_a_missing_virtual_server_names_the_kind() -> None:
    catalog = parse(
        virtual([{"name": "a"}]),
        agent("bot", [{"kind": "MCPVirtualServer", "name": "tools"}, {"kind": "MCPVirtualServer", "name": "nope"}]),
    )
    assert reference_problems(catalog) == ["MCPAgent 'bot': spec.mcpServerRefs[1]: no MCPVirtualServer named 'nope'"]


def test_an_agent_s_reference_by_kind_is_not_satisfied_by_the_other_kind() -> None:
    catalog = parse(
        virtual([{"name": "a"}]),
        agent("bot", [{"kind": "MCPVirtualServer", "name": "a"}, {"kind": "MCPServer", "name": "tools"}]),
    )
    assert reference_problems(catalog) == [
        "MCPAgent 'bot': spec.mcpServerRefs[0]: no MCPVirtualServer named 'a'",
        "MCPAgent 'bot': spec.mcpServerRefs[1]: no MCPServer named 'tools'",
    ]


def test_load_resources_refuses_the_file_with_each_reference_problem(tmp_path: Path) -> None:
    path = tmp_path / "resources.yaml"
    docs = [
        *SERVERS,
        virtual([{"name": "a"}, {"name": "ghost"}]),
        agent("bot", [{"kind": "MCPVirtualServer", "name": "nope"}]),
    ]
    path.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(ConfigError) as refused:
        load_resources(path)
    lines = str(refused.value).splitlines()
    assert f"{path}: MCPAgent 'bot': spec.mcpServerRefs[0]: no MCPVirtualServer named 'nope'" in lines
    assert f"{path}: MCPVirtualServer 'tools': spec.servers[1].name: no MCPServer named 'ghost'" in lines


def test_load_resources_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "resources.yaml"
    docs = [*SERVERS, virtual([{"name": "a", "prefix": "a_"}, {"name": "b"}])]
    path.write_text(yaml.safe_dump_all(docs))
    catalog = load_resources(path)
    assert list(catalog.virtual_servers) == ["tools"]
    assert list(catalog.servers) == ["a", "b", "c"]


def test_a_duplicate_virtual_server_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"document 5 \(MCPVirtualServer 'tools'\): metadata.name: duplicate"):
        parse(virtual([{"name": "a"}]), virtual([{"name": "b"}]))


def test_subset_for_an_agent_of_the_virtual_server_keeps_it_and_its_backends() -> None:
    full = parse_documents(
        [
            server("a", upstreamAuth={"bearer": {"secretRef": {"name": "a-token", "key": "t"}}}),
            server("b"),
            server("unused", upstreamAuth={"bearer": {"secretRef": {"name": "unused-token", "key": "t"}}}),
            virtual([{"name": "b", "prefix": "b_"}, {"name": "a"}]),
            virtual([{"name": "unused"}], name="other"),
            agent("bot", [{"kind": "MCPVirtualServer", "name": "tools"}]),
            agent("elsewhere", [{"name": "unused"}]),
            *(
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": n}, "stringData": {"t": "x"}}
                for n in ("a-token", "unused-token")
            ),
        ],
        "resources.yaml",
    )
    bot = full.agents["bot"]
    sub = full.subset(["tools"], agents=[bot])
    assert list(sub.virtual_servers) == ["tools"]
    assert sub.virtual_servers["tools"] == full.virtual_servers["tools"]
    assert list(sub.servers) == ["b", "a"]  # the backends, in the virtual server's order
    assert list(sub.agents) == ["bot"]
    assert [(r.kind, r.name) for r in sub.agents["bot"].spec.mcp_server_refs] == [("MCPVirtualServer", "tools")]
    assert list(sub.secrets) == ["a-token"]  # a backend's upstream auth comes along; nothing else
    assert reference_problems(sub) == []
