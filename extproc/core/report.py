"""The extension server's report: what its stages observed, for the controller to write into status.

In a cluster the controller cannot see what each extension server saw (the tools every
``tools/list`` listed, the backends a virtual server merged); it asks each one::

    controller (controller.runtime.reports)
        ──mint_token(the namespace's session key set)──▶ Authorization: Bearer <JWS, HS256:
          {"iss": "mcp-extproc", "aud": "mcp-extproc:report", "iat": now, "exp": now + 60}>
        ──GET http://<pod IP>:<report port>/report──▶ extproc.frontdoor.report (``serve --report``)
            ──verify_token──▶ refused: 401, nothing said
            ──Pipeline.report()──▶ 200 {"version": 1, "stages": {<stage>: Stage.report(), ...}}

The token is signed with the session key set, the one secret the controller and every
extension server of a namespace already share (the Secret ``mcp-extproc-session-keys``;
the agent's own containers never mount it). Its audience holds a colon, which no
``MCPServer`` name can (a DNS label), so a report token never passes as a session id,
nor a session id as a report token. Tokens live at most :data:`MAX_LIFETIME_S`.
"""

from __future__ import annotations

import time
from typing import Any, Final

from extproc.config.session_keys import ALGORITHM, BadToken, SessionKeys, decode_signed

ISSUER: Final = "mcp-extproc"
AUDIENCE: Final = "mcp-extproc:report"
LIFETIME_S: Final = 60
MAX_LIFETIME_S: Final = 300
"""A token whose ``exp`` is further than this from its ``iat`` is refused (no long-lived tokens)."""
VERSION: Final = 1
PATH: Final = "/report"


class BadReportToken(BadToken):
    """A report token that must not be accepted; ``reason`` is safe to log (never the token)."""


def mint_token(keys: SessionKeys, now: float | None = None) -> str:
    """A report token signed with ``keys``' signing key, valid for :data:`LIFETIME_S`."""
    import jwt  # only where reports are asked for or served (see extproc.core.report's users)

    issued = int(time.time() if now is None else now)
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "controller", "iat": issued, "exp": issued + LIFETIME_S}
    key = keys.signing
    return jwt.encode(payload, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid})


def verify_token(keys: SessionKeys, token: str, now: float | None = None) -> None:
    """Accept a report token, or raise.

    Raises:
        BadReportToken: malformed, signed by a key not in ``keys``, tampered with, of
            another audience or issuer, expired, issued in the future, or too long-lived.
    """
    moment = time.time() if now is None else now
    try:
        payload = decode_signed(keys, token, audience=AUDIENCE, issuer=ISSUER, require=["iss", "aud", "exp", "iat"])
    except BadToken as exc:
        raise BadReportToken(exc.reason) from None
    issued, expires = _seconds(payload.get("iat")), _seconds(payload.get("exp"))
    if expires <= moment:
        raise BadReportToken("expired")
    if issued > moment + 30:  # 30 s of clock skew between the controller's node and ours
        raise BadReportToken("issued_in_the_future")
    if expires - issued > MAX_LIFETIME_S:
        raise BadReportToken("too_long_lived")


def _seconds(value: Any) -> float:
    """A NumericDate claim's seconds (RFC 7519); a token with anything else is malformed."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadReportToken("malformed")
    return float(value)


__all__ = ["AUDIENCE", "PATH", "VERSION", "BadReportToken", "mint_token", "verify_token"]
