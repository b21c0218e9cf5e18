"""YAML that refuses a mapping key written twice, for the resource and pipeline files.

PyYAML (like most YAML libraries) keeps the last value of a repeated key, so a document
with ``deniedTools: ["delete_*"]`` followed by ``deniedTools: []`` would silently lose
its deny list. YAML itself says a mapping's keys are unique; :class:`UniqueKeyLoader`
holds files to that.

Data flow::

    text ──UniqueKeyLoader (a yaml.SafeLoader)──▶ per document: the composed node tree
         ──every mapping node, keys compared by their constructed value (1 and 0x1 are one key)──▶
             repeated ──▶ RepeatedKeyError(document, path, key, where it is and where it was first)
             unique   ──▶ constructed as yaml.safe_load would ──▶ Python objects

A merge key (``<<: *base``) may still be overridden by an explicit key: that is what a
merge is for. The callers (:func:`extproc.config.resources.load_resources`,
:func:`extproc.config.pipeline_file.load_pipeline_config`) turn the error into a
``ConfigError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["RepeatedKeyError", "UniqueKeyLoader", "load", "load_all"]


class RepeatedKeyError(ConstructorError):
    """A mapping key written twice in one mapping (a :class:`yaml.YAMLError`, with marks)."""

    def __init__(self, *, document: int, path: str, key: str, mark: Mark, first: Mark, label: str | None) -> None:
        self.document = document
        """The document's position in the file, from 1 (empty documents count, as in ``safe_load_all``)."""
        self.path = path
        """Where the repeated key is in its document, e.g. ``spec.deniedTools``."""
        self.key = key
        """The repeated key as written."""
        self.first = first
        """Where the key was written first."""
        self.label = label
        """``<kind> '<name>'`` when the document is a resource that says so, else ``None``."""
        problem = (
            f"{path}: the key {key!r} is repeated (first at line {first.line + 1}, column {first.column + 1}); "
            "YAML would keep only the last value and silently drop the first: write each key once"
        )
        super().__init__(None, None, problem, mark)

    def located(self, source: str, *, documents: bool) -> str:
        """The message for ``source``: ``<file>: [document N (<kind> '<name>'): ]line L, column C: <problem>``."""
        where = f"{source}: "
        if documents:
            where += f"document {self.document}" + (f" ({self.label})" if self.label else "") + ": "
        mark = self.problem_mark
        assert mark is not None
        return f"{where}line {mark.line + 1}, column {mark.column + 1}: {self.problem}"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`RepeatedKeyError` on a repeated mapping key."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._documents = 0

    def construct_document(self, node: Node) -> Any:
        self._documents += 1
        self._refuse_repeated_keys(node)
        return super().construct_document(node)

    def _refuse_repeated_keys(self, root: Node) -> None:
        seen_nodes: set[int] = set()  # aliases share nodes (and may even form cycles)
        pending: list[tuple[Node, str]] = [(root, "")]
        while pending:
            node, path = pending.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, SequenceNode):
                pending.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, MappingNode):
                first_marks: dict[Hashable, Mark] = {}
                for key_node, value_node in node.value:
                    key = self._key_of(key_node)
                    inner = _join(path, key_node)
                    if key is not _UNCOMPARABLE:
                        if key in first_marks:
                            raise RepeatedKeyError(
                                document=self._documents,
                                path=inner,
                                key=key_node.value,
                                mark=key_node.start_mark,
                                first=first_marks[key],
                                label=_resource_label(root),
                            )
                        first_marks[key] = key_node.start_mark
                    pending.append((value_node, inner))

    def _key_of(self, key_node: Node) -> Hashable:
        """A scalar key's value as the constructor will build it; other keys are not compared."""
        if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            return _UNCOMPARABLE
        key = self.construct_object(key_node)
        # Compared as the dict being built will compare them: 1, 0x1 and true are one key.
        return key if isinstance(key, Hashable) else _UNCOMPARABLE


_UNCOMPARABLE: Hashable = object()


def _join(path: str, key_node: Node) -> str:
    name = str(key_node.value) if isinstance(key_node, ScalarNode) else "?"
    return f"{path}.{name}" if path else name


def _lookup(node: Node, key: str) -> Node | None:
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == key:
                return value_node  # type: ignore[no-any-return]
    return None


def _resource_label(root: Node) -> str | None:
    kind, metadata = _lookup(root, "kind"), _lookup(root, "metadata")
    name = _lookup(metadata, "name") if metadata is not None else None
    if not isinstance(kind, ScalarNode):
        return None
    return f"{kind.value} {name.value!r}" if isinstance(name, ScalarNode) else str(kind.value)


def load(text: str) -> Any:
    """``yaml.safe_load``, refusing repeated keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - UniqueKeyLoader is a SafeLoader


def load_all(text: str) -> Iterator[Any]:
    """``yaml.safe_load_all``, refusing repeated keys (raised as the offending document is reached)."""
    return yaml.load_all(text, Loader=UniqueKeyLoader)
