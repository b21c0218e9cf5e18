"""One JSON member replaced, every other byte of the body kept (extproc.mcp.members)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.mcp.members import member_span, with_member

PATH = ("params", "name")


def test_only_the_value_changes_however_the_client_wrote_the_body() -> None:
    raw = b'{ "id" : 1.50e1 ,\n "params":{"arguments":{"name":"not me"}, "na\\u006de" : "p_echo" }, "method":"x"}'
    rewritten = with_member(raw, PATH, "echo")
    assert rewritten == raw.replace(b'"p_echo"', b'"echo"')
    assert json.loads(rewritten)["params"]["arguments"]["name"] == "not me"  # a nested `name` is not the one


def test_an_escaped_value_and_non_ascii_around_it_are_handled_by_bytes() -> None:
    raw = '{"params":{"arguments":{"t":"h\u00e9llo"},"name":"p\\u005fecho"}}'.encode()
    span = member_span(raw, PATH)
    assert span is not None
    start, end = span
    assert raw[start:end] == b'"p\\u005fecho"'
    assert with_member(raw, PATH, "\u00e9cho") == raw[:start] + b'"\\u00e9cho"' + raw[end:]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"params":{"arguments":{}}}',  # no name
        b'{"params":["name","x"]}',  # not an object on the way
        b'{"params":"name"}',
        b"[1, 2]",
        b"{}",
        b'{"params":{"name":}}',  # broken
        b'{"params":{"name"',
        b"",
    ],
)
def test_a_body_not_shaped_like_the_path_has_no_span(raw: bytes) -> None:
    assert member_span(raw, PATH) is None
    assert with_member(raw, PATH, "x") is None


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(
    before=st.dictionaries(st.text(max_size=6).filter(lambda k: k != "name"), _values, max_size=3),
    after=st.dictionaries(st.text(max_size=6).filter(lambda k: k != "name"), _values, max_size=3),
    name=st.text(),
    new=st.text(),
    indent=st.sampled_from([None, 0, 2]),
    ascii_only=st.booleans(),
)
def test_replacing_the_name_equals_parsing_and_setting_it(
    before: dict[str, Any], after: dict[str, Any], name: str, new: str, indent: int | None, ascii_only: bool
) -> None:
    params = {**before, "name": name, **{k: v for k, v in after.items() if k not in before}}
    raw = json.dumps({"jsonrpc": "2.0", "params": params}, indent=indent, ensure_ascii=ascii_only).encode()
    rewritten = with_member(raw, PATH, new)
    assert rewritten is not None
    expected = json.loads(raw)
    expected["params"]["name"] = new
    assert json.loads(rewritten) == expected
