"""Envoy's own local replies through the ext_proc adapter: a stream that starts with the response.

When Envoy answers a request itself before it reaches the ext_proc filter (a path with
``#``, a refused WebSocket upgrade), the encoder path still calls the extension server,
and the first message of the stream is ``response_headers``. Such a reply carries its own
status and must pass through unchanged, never become a 500.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.frontdoor.ext_proc import Processor
from tests.messages import body_msg, headers_msg


def processor(catalog: Catalog) -> Processor:
    return Processor(Registry().build_pipeline(DEFAULT_PIPELINE), catalog)


LOCAL_REPLY = {":status": "400", "content-type": "text/plain", "content-length": "11"}


async def test_a_local_reply_passes_through_with_its_own_status(catalog: Catalog) -> None:
    proc = processor(catalog)
    answer = await proc.handle(headers_msg(LOCAL_REPLY, response=True))
    assert answer.WhichOneof("response") == "response_headers"
    assert answer.response_headers == pb.HeadersResponse()  # no mutation, no status change
    assert not answer.HasField("mode_override")
    body = await proc.handle(body_msg(b"Bad Request", response=True))
    assert body.WhichOneof("response") == "response_body"
    assert body.response_body == pb.BodyResponse()
    trailers = await proc.handle(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert trailers.WhichOneof("response") == "response_trailers"
    await proc.close()


async def test_a_request_body_without_request_headers_is_still_refused(catalog: Catalog) -> None:
    """Only response phases pass: a request body nobody saw the headers of fails closed."""
    proc = processor(catalog)
    answer = await proc.handle(body_msg({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 500
