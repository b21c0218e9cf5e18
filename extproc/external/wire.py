"""JSON ↔ protobuf conversions of the external stage protocol (``mcp_extproc.stage.v1``).

Shared by the caller (``plugins/external.py``) and the author's kit
(:mod:`extproc.external.kit`), so both sides agree on one rule: JSON numbers travel
as doubles (``google.protobuf.Value``) and come back as integers when they are
integral and exactly representable, so ``{"a": 2}`` stays ``{"a": 2}``.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from google.protobuf import json_format, struct_pb2

from extproc.errors import PluginError
from mcp_extproc.stage.v1 import stage_pb2 as pb

NAME_RE: Final = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
"""What a stage's name must look like."""
_METHOD_RE: Final = re.compile(r"^[A-Za-z0-9_/*?.\[\]!-]{1,128}$")
_KNOWN_PHASES: Final = frozenset({pb.PHASE_REQUEST, pb.PHASE_RESPONSE})

_MAX_EXACT_INT: Final = 2**53


def _ints_back(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints_back(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Mappings (e.g. read-only views) as dicts, tuples as lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_struct(obj: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a ``Struct``.

    Raises:
        ValueError: a value is not JSON (e.g. a NaN, or an integer past 2**53 would lose precision silently:
            such integers are sent as their nearest double).
    """
    struct = struct_pb2.Struct()
    struct.update(_plain(obj))
    return struct


def to_value(value: Any) -> struct_pb2.Value:
    """Any JSON value as a ``Value``."""
    out = struct_pb2.Value()
    json_format.ParseDict(_plain(value), out)
    return out


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``Struct`` as a JSON object (integral numbers as ints)."""
    result: dict[str, Any] = _ints_back(json_format.MessageToDict(struct))
    return result


def from_value(value: struct_pb2.Value) -> Any:
    """A ``Value`` as a JSON value (integral numbers as ints; an unset Value is ``None``)."""
    if value.WhichOneof("kind") is None:
        return None
    return _ints_back(json_format.MessageToDict(value))


def message_json(message: pb.McpMessage) -> dict[str, Any]:
    """The fields of an ``McpMessage`` as plain JSON values (for authors and logs)."""
    return {
        "method": message.method,
        "id": from_value(message.id) if message.HasField("id") else None,
        "tool": message.tool or None,
        "arguments": from_struct(message.arguments) if message.HasField("arguments") else None,
        "params": from_struct(message.params) if message.HasField("params") else None,
        "result": from_struct(message.result) if message.HasField("result") else None,
        "error": (
            {
                "code": message.error.code,
                "message": message.error.message,
                **({"data": from_value(message.error.data)} if message.error.HasField("data") else {}),
            }
            if message.HasField("error")
            else None
        ),
    }


def validate_description(answer: pb.DescribeResponse, where: str) -> pb.DescribeResponse:
    """Check a ``Describe`` answer against the protocol's rules.

    Raises:
        PluginError: naming the stage, the field, what it was and what would be right.
    """
    if not NAME_RE.match(answer.name):
        raise PluginError(
            f"{where}: Describe answered name={answer.name!r}; expected 1-63 characters of [a-z0-9-] "
            "starting with a letter"
        )
    where = f"{where} (stage {answer.name!r})"
    phases = list(answer.phases)
    if not phases:
        raise PluginError(f"{where}: Describe answered no phases; expected PHASE_REQUEST and/or PHASE_RESPONSE")
    for phase in phases:
        if phase not in _KNOWN_PHASES:
            label = pb.Phase.Name(phase) if phase in pb.Phase.values() else str(phase)
            raise PluginError(
                f"{where}: Describe answered phases containing {label}; expected PHASE_REQUEST or PHASE_RESPONSE"
            )
    if len(set(phases)) != len(phases):
        raise PluginError(f"{where}: Describe answered a phase twice in phases={[pb.Phase.Name(p) for p in phases]}")
    for method in answer.methods:
        if not _METHOD_RE.match(method):
            raise PluginError(
                f"{where}: Describe answered methods containing {method!r}; expected JSON-RPC method names "
                "or globs such as 'tools/call' or 'tools/*'"
            )
    if answer.failure_mode not in pb.FailureMode.values():
        raise PluginError(
            f"{where}: Describe answered failure_mode={answer.failure_mode}; expected FAILURE_MODE_CLOSED or "
            "FAILURE_MODE_OPEN"
        )
    return answer
