"""Incremental SSE decoding: events out, every byte preserved, however the stream is chunked."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.mcp import SseDecoder, SseEvent, SseTooLarge, encode_event


def decode(chunks: Iterable[bytes], max_event_bytes: int = 1 << 20) -> tuple[list[SseEvent], bytes]:
    decoder = SseDecoder(max_event_bytes)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events, decoder.flush()


def fields(events: list[SseEvent]) -> list[tuple[str, str | None, str | None]]:
    return [(e.data, e.event, e.id) for e in events if not e.is_comment_only]


def test_a_json_rpc_result_event() -> None:
    stream = b'event: message\nid: 7\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
    events, tail = decode([stream])
    assert events == [SseEvent(stream, '{"jsonrpc":"2.0","id":1,"result":{}}', "message", "7")]
    assert tail == b""


def test_data_lines_join_with_newlines_and_lose_one_leading_space() -> None:
    events, _ = decode([b"data: a\ndata:b\ndata:  c\ndata\ndata:\n\n"])
    assert events[0].data == "a\nb\n c\n\n"


def test_comments_and_unknown_fields_carry_nothing() -> None:
    events, _ = decode([b": keepalive\n\nretry: 1000\nfoo: bar\n\n\n"])
    assert [e.raw for e in events] == [b": keepalive\n\n", b"retry: 1000\nfoo: bar\n\n", b"\n"]
    assert all(e.is_comment_only for e in events)


def test_an_event_type_or_id_alone_is_not_comment_only() -> None:
    events, _ = decode([b"event: ping\n\nid: 4\n\n"])
    assert [(e.event, e.id, e.is_comment_only) for e in events] == [("ping", None, False), (None, "4", False)]


def test_an_id_holding_nul_is_ignored() -> None:
    events, _ = decode([b"id: a\x00b\ndata: x\n\n"])
    assert events[0].id is None


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol: bytes) -> None:
    stream = b"event: e" + eol + b"data: 1" + eol + b"data: 2" + eol + eol + b"data: 3" + eol + eol
    events, tail = decode([stream])
    if eol == b"\r":  # the decoder waits to see whether a "\n" follows the last "\r"
        assert fields(events) == [("1\n2", "e", None)] and tail == b"data: 3\r\r"
    else:
        assert fields(events) == [("1\n2", "e", None), ("3", None, None)] and tail == b""


def test_a_crlf_split_across_chunks_stays_one_line_ending() -> None:
    events, tail = decode([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
    assert fields(events) == [("a", None, None), ("b", None, None)] and tail == b""


def test_a_character_split_across_chunks_decodes_whole() -> None:
    encoded = "data: grüße 👋\n\n".encode()
    cut = encoded.index("👋".encode()) + 2
    events, _ = decode([encoded[:cut], encoded[cut:]])
    assert events[0].data == "grüße 👋"


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    events, _ = decode([b"data: \xff\n\n"])
    assert events[0].data == "\ufffd"


def test_a_leading_byte_order_mark_is_ignored_but_kept() -> None:
    events, _ = decode([b"\xef\xbb", b"\xbfdata: x\n\n"])
    assert events[0].raw == b"\xef\xbb\xbfdata: x\n\n" and events[0].data == "x"


def test_pending_holds_the_unfinished_event_and_flush_resets() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\nda") == [SseEvent(b"data: 1\n\n", "1", None, None)]
    assert decoder.pending == b"data: 2\nda"
    assert decoder.feed(b"ta: 3") == []
    assert decoder.flush() == b"data: 2\ndata: 3"
    assert decoder.pending == b""
    assert fields(decoder.feed(b"\xef\xbb\xbfdata: 4\n\n")) == [("4", None, None)]  # a new stream


def test_an_event_past_the_limit_raises_in_one_chunk() -> None:
    with pytest.raises(SseTooLarge, match="16-byte limit"):
        SseDecoder(16).feed(b"data: " + b"x" * 20 + b"\n\n")


def test_an_event_past_the_limit_raises_while_still_arriving() -> None:
    decoder = SseDecoder(16)
    decoder.feed(b"data: 0123")
    with pytest.raises(SseTooLarge):
        decoder.feed(b"456789abc")


def test_many_small_events_in_one_big_chunk_are_within_the_limit() -> None:
    events, _ = decode([b"data: 12345\n\n" * 1000], max_event_bytes=13)
    assert len(events) == 1000


def test_a_large_event_in_small_chunks() -> None:
    payload = b"x" * 200_000
    stream = b"data: " + payload + b"\n\n"
    events, tail = decode(stream[i : i + 7] for i in range(0, len(stream), 7))
    assert [e.data for e in events] == [payload.decode()] and tail == b""


def test_encode_event() -> None:
    assert encode_event("a\nb\r\nc", event="message", id="9") == b"event: message\nid: 9\ndata: a\ndata: b\ndata: c\n\n"
    assert encode_event("") == b"data: \n\n"


@pytest.mark.parametrize(("event", "id"), [("a\nb", None), (None, "1\r"), (None, "a\x00")])
def test_encode_event_refuses_field_injection(event: str | None, id: str | None) -> None:
    with pytest.raises(ValueError, match="line break or NUL"):
        encode_event("x", event=event, id=id)


# Properties

line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
eol_st = st.sampled_from([b"\n", b"\r\n", b"\r"])
line_st = st.one_of(
    st.builds(lambda v: f"data: {v}".encode(), line_text),
    st.builds(lambda v: f"data:{v}".encode(), line_text),
    st.builds(lambda v: f"event: {v}".encode(), line_text),
    st.builds(lambda v: f"id: {v}".encode(), line_text),
    st.builds(lambda v: f": {v}".encode(), line_text),
    st.builds(lambda v: f"retry: {v}".encode(), line_text),
    st.just(b""),
)
stream_st = st.lists(st.tuples(line_st, eol_st), max_size=25).map(lambda ls: b"".join(a + b for a, b in ls))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(stream_st | st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=20))
def test_any_chunking_gives_the_same_events_and_every_byte_back(stream: bytes, cuts: list[int]) -> None:
    whole_events, whole_tail = decode([stream])
    events, tail = decode(split(stream, cuts))
    assert events == whole_events and tail == whole_tail
    assert b"".join(e.raw for e in events) + tail == stream


@given(stream_st)
def test_byte_at_a_time_matches_one_feed(stream: bytes) -> None:
    assert decode([bytes([b]) for b in stream]) == decode([stream])


@given(
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.none() | line_text,
    st.none() | line_text.filter(lambda s: "\0" not in s),
)
def test_encode_event_round_trips(data: str, event: str | None, id: str | None) -> None:
    raw = encode_event(data, event=event, id=id)
    events, tail = decode([raw])
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert events == [SseEvent(raw, expected, event, id)] and tail == b""
