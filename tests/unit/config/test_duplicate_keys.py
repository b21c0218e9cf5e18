"""A mapping key written twice is refused, in the resource file and in the pipeline file.

Plain YAML loading keeps the last value: ``deniedTools: ["delete_*"]`` then ``deniedTools: []``
would have passed ``check`` with an empty deny list. Each refusal names the file, the document,
the line and column of the repeated key, the key and where it was first.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from extproc.commands.cli import main
from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.config.resources import Catalog, load_resources
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.core.reload import try_reload, watch
from extproc.errors import ConfigError

OTHER = """\
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPServer
metadata: {name: other}
spec: {url: "http://127.0.0.1:8081/mcp"}
---
"""
GOOD = """\
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPServer
metadata: {name: demo}
spec:
  url: http://127.0.0.1:8080/mcp
  allowedTools: ["*"]
  deniedTools: ["delete_*"]
"""
REPEATED = GOOD + "  deniedTools: []\n"
"""The deny list written twice: the second (empty) one would win."""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def refused_message(path: Path) -> str:
    return (
        f"{path}: document 2 (MCPServer 'demo'): line 13, column 3: spec.deniedTools: the key 'deniedTools' "
        "is repeated (first at line 12, column 3); YAML would keep only the last value and silently drop the "
        "first: write each key once"
    )


def test_a_repeated_key_in_a_resource_file_is_refused_with_file_document_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "resources.yaml", OTHER + REPEATED)
    with pytest.raises(ConfigError) as caught:
        load_resources(path)
    assert str(caught.value) == refused_message(path)


def test_check_refuses_a_repeated_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "resources.yaml", OTHER + REPEATED)
    assert main(["check", "-f", str(path)]) == 2
    assert refused_message(path) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # In a list of a list: the path says which element.
        (
            GOOD.replace("deniedTools:", "x:\n    - [{a: 1, a: 2}]\n  deniedTools:"),
            "line 8, column 15: spec.x[0][0].a: the key 'a' is repeated (first at line 8, column 9)",
        ),
        # Keys compare as the mapping will hold them: 1 and 0x1 are one key.
        (
            GOOD.replace("metadata: {name: demo}", "metadata: {name: demo, labels: {1: a, 0x1: b}}"),
            "line 3, column 39: metadata.labels.0x1: the key '0x1' is repeated (first at line 3, column 33)",
        ),
        # At the top of the document.
        (GOOD + "kind: MCPServer\n", "line 8, column 1: kind: the key 'kind' is repeated (first at line 2"),
    ],
)
def test_every_mapping_is_checked(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "resources.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_resources(path)
    assert str(caught.value).startswith(f"{path}: document 1 (MCPServer 'demo'): {expected}")


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    text = GOOD.replace("spec:\n", "spec:\n  <<: {deniedTools: [x], allowedTools: [y]}\n")
    catalog = load_resources(write(tmp_path / "resources.yaml", text))
    assert catalog.servers["demo"].spec.denied_tools == ["delete_*"]


def test_a_repeated_key_in_the_pipeline_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = write(
        tmp_path / "pipeline.yaml",
        "version: v1\nstages:\n  - name: authn\n  - name: mcp\n    failureMode: closed\n    failureMode: open\n",
    )
    expected = (
        f"{pipeline}: line 6, column 5: stages[1].failureMode: the key 'failureMode' is repeated "
        "(first at line 5, column 5); YAML would keep only the last value and silently drop the first: "
        "write each key once"
    )
    with pytest.raises(ConfigError) as caught:
        load_pipeline_config(pipeline)
    assert str(caught.value) == expected
    resources = write(tmp_path / "resources.yaml", GOOD)
    assert main(["check", "-f", str(resources), "--pipeline", str(pipeline)]) == 2
    assert expected in capsys.readouterr().err


def test_the_stages_key_twice_is_refused(tmp_path: Path) -> None:
    pipeline = write(tmp_path / "pipeline.yaml", "version: v1\nstages: [{name: mcp}]\nstages: []\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: stages: the key 'stages' is repeated"):
        load_pipeline_config(pipeline)


def default_pipeline() -> Pipeline:
    return Registry().build_pipeline(DEFAULT_PIPELINE)


def test_a_reload_of_a_file_with_a_repeated_key_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "resources.yaml", OTHER + GOOD)
    current = load_resources(path)
    metrics = Metrics()
    write(path, OTHER + REPEATED)
    assert try_reload(path, default_pipeline(), current, metrics) is None
    assert metrics.reloads.labels("refused")._value.get() == 1
    assert metrics.reloads.labels("applied")._value.get() == 0
    refused = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(refused) == 1 and refused_message(path) in refused[0].getMessage()


class Server:
    """What :func:`extproc.core.reload.watch` swaps the catalog of."""

    def __init__(self, catalog: Catalog) -> None:
        self.pipeline = default_pipeline()
        self.catalog = catalog

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog


class Refused(logging.Handler):
    """Sets ``seen`` when the reload logs its refusal."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.set()


async def test_while_running_the_last_good_catalog_stays(tmp_path: Path) -> None:
    path = write(tmp_path / "resources.yaml", OTHER + GOOD)
    good = load_resources(path)
    server, metrics, refused = Server(good), Metrics(), Refused()
    logging.getLogger("mcp_extproc.reload").addHandler(refused)
    watcher = asyncio.create_task(watch(path, server, metrics, interval=0.01))
    try:
        await asyncio.sleep(0.05)  # the watcher has taken the file's first stamp
        write(path, OTHER + REPEATED)
        async with asyncio.timeout(5):
            await refused.seen.wait()
    finally:
        watcher.cancel()
        logging.getLogger("mcp_extproc.reload").removeHandler(refused)
    assert metrics.reloads.labels("refused")._value.get() == 1
    assert server.catalog is good
    assert server.catalog.servers["demo"].spec.denied_tools == ["delete_*"]
