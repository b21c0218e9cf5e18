"""Gateway-issued session ids: a compact JWS naming the upstream's session and who may use it.

On ``initialize`` the upstream's ``Mcp-Session-Id`` is replaced by one of these; every
later request's id is verified and swapped back before anything is forwarded::

    mint(SessionClaims(upstream id, server, principal, agent))
        ─▶ header {"alg": "HS256", "kid": <signing key>, "typ": "JWT"}
           payload {"iss": "mcp-extproc", "aud": <server>, "sub": <issuer|subject>,
                    "agt": <agent>, "sid": <upstream id>, "iat": now, "exp": now + max age}
    verify(token, server)
        seen before and not expired ─▶ the cached claims (a dict lookup)
        else: kid known? signature (HS256)? iss, aud == server? exp? ─▶ SessionClaims
        anything else ─▶ BadSessionId(reason)

The principal is ``issuer|subject`` (and the agent), never the token's bytes: a refreshed
token of the same caller keeps its session. Comparing the principal is the caller's job
(:meth:`SessionClaims.belongs_to`). Verified ids are cached (bounded, least recently used
go first); an id is a pure function of its bytes and the key set, so the cache can never
accept what the keys would refuse, except that removing a key from the set takes a
restart to take effect (the key set is read once, at startup). PyJWT (about 9 MB
resident) is imported when the first id is minted or checked, not at startup.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.config.session_keys import ALGORITHM, BadToken, SessionKeys, decode_signed

ISSUER = "mcp-extproc"
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0


class BadSessionId(Exception):
    """A session id that is not ours, not for this server, or no longer valid.

    Attributes:
        reason: ``malformed``, ``unknown_key``, ``bad_signature``, ``expired`` or ``other_server``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a gateway session id says.

    Attributes:
        upstream_id: the ``Mcp-Session-Id`` the MCP server issued.
        server: the ``MCPServer`` it belongs to.
        principal: ``issuer|subject`` of the caller that opened it (``anonymous`` without authn).
        agent: the ``MCPAgent`` the caller was matched to, if any.
        expires: when the id stops being valid (seconds since the epoch).
        extra: what the minter added (``ext``): a virtual server keeps the client's
            ``initialize`` parameters there, to open backend sessions after a restart.
    """

    upstream_id: str
    server: str
    principal: str
    agent: str | None = None
    expires: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def belongs_to(self, principal: str, agent: str | None) -> bool:
        """True when ``principal`` (and its agent) is the caller the session was opened by."""
        return self.principal == principal and self.agent == agent


class SessionIds:
    """Mint and verify gateway session ids with one key set."""

    def __init__(
        self,
        keys: SessionKeys,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.max_age_s = max_age_s
        self.cache_size = cache_size
        self.clock = clock
        self._verified: OrderedDict[tuple[str, str], SessionClaims] = OrderedDict()

    def mint(
        self, upstream_id: str, server: str, principal: str, agent: str | None, extra: Mapping[str, Any] | None = None
    ) -> str:
        """A signed session id for the upstream's ``upstream_id`` (``extra``: signed along, as ``ext``)."""
        import jwt  # only once a session is opened (see the module imports)

        now = int(self.clock())
        payload: dict[str, object] = {
            "iss": ISSUER,
            "aud": server,
            "sub": principal,
            "sid": upstream_id,
            "iat": now,
            "exp": now + int(self.max_age_s),
        }
        if agent is not None:
            payload["agt"] = agent
        if extra:
            payload["ext"] = dict(extra)
        key = self.keys.signing
        return jwt.encode(payload, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid})

    def verify(self, token: str, server: str) -> SessionClaims:
        """The claims of a valid id of ``server``.

        Raises:
            BadSessionId: the id is malformed, signed by a key not in the set, tampered
                with, expired, or issued for another server.
        """
        cached = self._verified.get((server, token))
        if cached is not None:
            if cached.expires <= self.clock():
                del self._verified[(server, token)]
                raise BadSessionId("expired")
            self._verified.move_to_end((server, token))
            return cached
        claims = self._decode(token, server)
        self._verified[(server, token)] = claims
        while len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)
        return claims

    def _decode(self, token: str, server: str) -> SessionClaims:
        try:  # expiry is checked below, on this object's clock
            payload = decode_signed(
                self.keys, token, audience=server, issuer=ISSUER, require=["iss", "aud", "sub", "sid", "exp", "iat"]
            )
        except BadToken as exc:
            raise BadSessionId("other_server" if exc.reason == "other_audience" else exc.reason) from None
        upstream_id, principal, agent, expires = (payload.get(k) for k in ("sid", "sub", "agt", "exp"))
        if not isinstance(upstream_id, str) or not upstream_id or not isinstance(principal, str):
            raise BadSessionId("malformed")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise BadSessionId("malformed")
        if expires <= self.clock():
            raise BadSessionId("expired")
        extra = payload.get("ext")
        return SessionClaims(
            upstream_id,
            server,
            principal,
            agent if isinstance(agent, str) else None,
            float(expires),
            extra if isinstance(extra, dict) else {},
        )
