"""Resource documents: what `mcp-extproc check` accepts, and what it says when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.config.resources import load_resources
from extproc.errors import ConfigError

GOOD = """\
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPServer
metadata: {name: demo}
spec:
  url: http://127.0.0.1:8080/mcp
  allowedTools: ["echo", "get_*"]
  deniedTools: ["get_secret"]
---
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPServer
metadata: {name: other}
spec: {url: "https://mcp.example.test/v1/mcp"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "resources.yaml"
    path.write_text(text)
    return path


def test_loads_every_server_with_its_rules(tmp_path: Path) -> None:
    catalog = load_resources(write(tmp_path, GOOD))
    assert sorted(catalog.servers) == ["demo", "other"]
    demo = catalog.servers["demo"]
    assert demo.spec.allowed_tools == ["echo", "get_*"]
    assert demo.spec.denied_tools == ["get_secret"]
    assert catalog.servers["other"].spec.allowed_tools == []  # empty allows none
    assert catalog.server_for_path("/demo/mcp?x=1") is demo
    assert catalog.server_for_path("/nope/mcp") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("url: http://127.0.0.1:8080/mcp", "url: ftp://x/mcp"),
            "document 1 (MCPServer 'demo'): spec.url: Value error, must be an http:// or https:// URL",
        ),
        (
            GOOD.replace("allowedTools", "allowedTool"),
            "document 1 (MCPServer 'demo'): spec.allowedTool: Extra inputs",
        ),
        (
            GOOD.replace("kind: MCPServer\nmetadata: {name: other}", "kind: MCPServr\nmetadata: {name: other}"),
            "kind: must be one of",
        ),
        (GOOD.replace("name: demo", "name: Demo_1"), "metadata.name: Value error, must be a DNS-1123 label"),
        (GOOD.replace("name: other", "name: demo"), "metadata.name: duplicate MCPServer 'demo'"),
        (
            GOOD.replace(
                "v1alpha1\nkind: MCPServer\nmetadata: {name: other}",
                "v1\nkind: MCPServer\nmetadata: {name: other}",
            ),
            "apiVersion: must be",
        ),
        (
            "apiVersion: mcp.extproc.io/v1alpha1\nkind: MCPServer\nmetadata: {name: x}\n",
            "spec: Field required",
        ),
        ("- just a list\n", "document 1: expected a mapping"),
        ("a: [unclosed\n", "not valid YAML (line 2"),
        ("", "no MCPServer documents"),
    ],
)
def test_bad_documents_name_file_kind_name_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_resources(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_resources(tmp_path / "absent.yaml")
