"""The one table of JSON-RPC codes and HTTP statuses, against the MCP SDK's."""

from __future__ import annotations

from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS

from extproc.api import Deny
from extproc.mcp.codes import (
    AUTH_UNAVAILABLE,
    ERROR_HTTP_STATUS,
    POLICY_DENIED,
    RATE_LIMITED,
    UNAUTHENTICATED,
    http_status_for,
)
from extproc.mcp.spec import INTERNAL_ERROR


def test_protocol_codes_travel_with_the_sdks_statuses() -> None:
    shared = ERROR_HTTP_STATUS.keys() & ERROR_CODE_HTTP_STATUS.keys()
    assert len(shared) == 5  # parse error, invalid request/params, method not found, header mismatch
    assert {code: ERROR_HTTP_STATUS[code] for code in shared} == {code: ERROR_CODE_HTTP_STATUS[code] for code in shared}


def test_the_gateways_own_codes() -> None:
    statuses = [http_status_for(c) for c in (UNAUTHENTICATED, AUTH_UNAVAILABLE, POLICY_DENIED, RATE_LIMITED)]
    assert statuses == [401, 503, 200, 429]
    assert http_status_for(INTERNAL_ERROR) == 500
    assert http_status_for(-32099) == 200  # a stage's own code: JSON-RPC level, like the SDK's servers
    assert http_status_for(-32099, default=403) == 403


def test_a_denial_without_a_status_takes_its_codes() -> None:
    assert Deny(code=POLICY_DENIED, message="no").status == 200
    assert Deny(code=RATE_LIMITED, message="slow down").status == 429
    assert Deny(code=POLICY_DENIED, message="no", status=403).status == 403
