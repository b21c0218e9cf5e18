"""The bootstrap asks Envoy for the client certificate's SPIFFE ID only when an agent is known by one."""

from __future__ import annotations

from typing import Any

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog, parse_documents
from extproc.core.registry import Registry
from extproc.render.bootstrap import render_bootstrap
from extproc.render.options import BootstrapOptions
from extproc.render.wire import EXT_AUTHZ_FILTER, EXT_PROC_FILTER, PEER_ATTRIBUTE
from tests.messages import SERVER_DOC

PIPELINE = Registry().build_pipeline(DEFAULT_PIPELINE)


def agent(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAgent",
        "metadata": {"name": "robot", "namespace": "agents"},
        "spec": {"mcpServerRefs": [{"name": "demo"}], **spec},
    }


def filters(catalog: Catalog, options: BootstrapOptions) -> dict[str, dict[str, Any]]:
    config = render_bootstrap(catalog, PIPELINE.needs, options)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def test_ext_proc_asks_for_the_peer_only_for_a_service_account_agent() -> None:
    known = parse_documents([SERVER_DOC, agent(identity={"serviceAccount": "robot"})], "test")
    assert filters(known, BootstrapOptions())[EXT_PROC_FILTER]["request_attributes"] == [PEER_ATTRIBUTE]
    for docs in ([SERVER_DOC], [SERVER_DOC, agent()]):
        assert "request_attributes" not in filters(parse_documents(docs, "test"), BootstrapOptions())[EXT_PROC_FILTER]


def test_no_fast_routes_over_http_which_cannot_carry_the_peer() -> None:
    known = parse_documents([SERVER_DOC, agent(identity={"serviceAccount": "robot"})], "test")
    fast = PIPELINE.fast_call_eras
    over_http = BootstrapOptions(fast_calls=fast, authz_http_unix="/tmp/authz.sock")
    assert EXT_AUTHZ_FILTER not in filters(known, over_http), "every call through ext_proc, which carries the peer"
    bare = parse_documents([SERVER_DOC, agent()], "test")
    assert EXT_AUTHZ_FILTER in filters(bare, over_http)
    # The gRPC Check carries the peer (source.principal): its fast routes stay.
    assert EXT_AUTHZ_FILTER in filters(known, BootstrapOptions(fast_calls=fast))
