"""The body splice a virtual server's fast call carries in a header (extproc.core.splice).

(The Lua script that applies it in Envoy: tests/integration/test_virtual_fast_calls.py.)
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core.splice import MAX_REPLACEMENT_BYTES, apply_splice, splice_of


def test_a_prefix_taken_off_is_a_small_header() -> None:
    original = b'{"params":{"name":"github_search","arguments":{}}}'
    rewritten = original.replace(b"github_search", b"search")
    value = splice_of(original, rewritten)
    assert value is not None
    assert value.startswith(f"{len(original)}:")
    assert apply_splice(original, value) == rewritten


def test_an_unchanged_body_is_an_empty_splice() -> None:
    body = b'{"id":1}'
    value = splice_of(body, body)
    assert value == "8:8:8:"
    assert apply_splice(body, value) == body


def test_a_large_rewrite_has_no_splice() -> None:
    original = b"{}"
    assert splice_of(original, b"{" + b"x" * (MAX_REPLACEMENT_BYTES + 1) + b"}") is None
    assert splice_of(original, b"{" + b"x" * MAX_REPLACEMENT_BYTES + b"}") is not None


@pytest.mark.parametrize("value", ["", "1:2:3", "a:0:0:", "3:0:0:<", "3:0:0:x y", "-1:0:0:"])
def test_a_malformed_header_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        apply_splice(b"abc", value)


@pytest.mark.parametrize("value", ["4:0:0:", "3:2:1:", "3:0:4:"])
def test_a_header_for_another_body_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        apply_splice(b"abc", value)


@given(original=st.binary(max_size=200), rewritten=st.binary(max_size=200))
def test_applying_the_splice_gives_the_rewritten_body(original: bytes, rewritten: bytes) -> None:
    value = splice_of(original, rewritten)
    assert value is not None  # never past the limit at these sizes
    assert apply_splice(original, value) == rewritten
    # Only the characters the Lua script's pattern accepts.
    assert all(c.isalnum() or c in "%._~-:" for c in value)


@given(head=st.binary(max_size=50), old=st.binary(max_size=20), new=st.binary(max_size=20), tail=st.binary(max_size=50))
def test_the_splice_replaces_no_more_than_what_changed(head: bytes, old: bytes, new: bytes, tail: bytes) -> None:
    value = splice_of(head + old + tail, head + new + tail)
    assert value is not None
    _, start, stop, replacement = value.split(":")
    assert int(stop) - int(start) <= len(old)
    assert len(unquote_to_bytes(replacement)) <= len(new)
