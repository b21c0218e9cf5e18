"""A local OAuth 2.1 authorization server for tests: real signed tokens, on loopback.

Start it as a process::

    python -m tests.upstreams.oauth_server --port 0 --client gateway:s3cret --expires-in 300

It prints `READY <port>` once it accepts connections. Endpoints:

- `POST /token` — the token endpoint. Client authentication: `client_secret_basic`
  (or `client_secret_post`). Grants:
  - `client_credentials` with optional `scope`, `audience` and RFC 8707 `resource`;
  - RFC 8693 token exchange (`urn:ietf:params:oauth:grant-type:token-exchange`): the
    `subject_token` must be a JWT this server signed (see `/issue`); the issued token
    keeps its `sub` and names the client in `act`.
  Tokens are RS256 JWTs (joserfc) with `iss`, `sub`, `aud` (audience or resource),
  `scope`, `client_id`, `iat`, `exp`, `jti`. Errors follow RFC 6749 section 5.2.
- `GET /jwks` — the public key set, for anyone validating these tokens (the authn stage).
- `POST /issue` — `{"sub": ..., "aud": ..., "expires_in": ...}` → a signed JWT for an
  agent (this server doubles as the agents' identity provider in tests).
- `GET /admin/requests` — every token request so far (grant, client, scope, audience,
  resource, subject's `sub`, outcome; never a secret or token).
- `POST /admin/behaviour` — `{"fail_status": 500|null, "delay_s": 0.5, "expires_in": 2}`
  changes how later token requests are answered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote_plus

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.upstreams.serving import bind_loopback, serve_ready

TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"


@dataclass
class Behaviour:
    """How token requests are answered right now."""

    expires_in: int = 300
    fail_status: int | None = None
    delay_s: float = 0.0


@dataclass
class AuthServer:
    """The server's state: its signing key, clients, behaviour and request log."""

    clients: dict[str, str]
    issuer: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": uuid.uuid4().hex}))
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def sign(self, claims: dict[str, Any]) -> str:
        """A compact RS256 JWT of ``claims``."""
        return jwt.encode({"alg": "RS256", "kid": self.key.kid, "typ": "JWT"}, claims, self.key)

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this server signed and that has not expired, else None."""
        try:
            decoded = jwt.decode(token, self.key, algorithms=["RS256"])
        except (JoseError, ValueError):
            return None
        claims = dict(decoded.claims)
        exp = claims.get("exp")
        if claims.get("iss") != self.issuer or not isinstance(exp, int) or exp < time.time():
            return None
        return claims


def _error(error: str, status: int = 400, description: str = "") -> JSONResponse:
    body = {"error": error}
    if description:
        body["error_description"] = description
    return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})


def _client_auth(request: Request, form: dict[str, str]) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            raw = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, sep, secret = raw.partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) if sep else None
    if "client_id" in form and "client_secret" in form:
        return form["client_id"], form["client_secret"]
    return None


def build_app(server: AuthServer) -> Starlette:
    """The Starlette app serving the endpoints of the module docstring."""

    async def token(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        entry: dict[str, Any] = {
            "grant_type": form.get("grant_type"),
            "scope": form.get("scope"),
            "audience": form.get("audience"),
            "resource": form.get("resource"),
            "client_id": None,
            "subject": None,
            "at": time.time(),
        }
        server.requests.append(entry)
        behaviour = server.behaviour
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.fail_status is not None:
            entry["outcome"] = "failed"
            return _error("server_error", behaviour.fail_status, "told to fail")
        auth = _client_auth(request, form)
        if auth is None or server.clients.get(auth[0]) != auth[1]:
            entry["outcome"] = "invalid_client"
            return _error("invalid_client", 401)
        client_id = entry["client_id"] = auth[0]
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": server.issuer,
            "client_id": client_id,
            "iat": now,
            "exp": now + behaviour.expires_in,
            "jti": uuid.uuid4().hex,
        }
        audience = form.get("audience") or form.get("resource")
        if audience:
            claims["aud"] = audience
        if form.get("scope"):
            claims["scope"] = form["scope"]
        grant = form.get("grant_type")
        if grant == "client_credentials":
            claims["sub"] = client_id
        elif grant == TOKEN_EXCHANGE:
            if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
                entry["outcome"] = "invalid_request"
                return _error("invalid_request", 400, "subject_token_type must be an access token")
            subject = server.verify(form.get("subject_token", ""))
            if subject is None:
                entry["outcome"] = "invalid_grant"
                return _error("invalid_grant", 400, "subject_token is not valid")
            entry["subject"] = claims["sub"] = subject.get("sub")
            claims["act"] = {"sub": client_id}
        else:
            entry["outcome"] = "unsupported_grant_type"
            return _error("unsupported_grant_type")
        entry["outcome"] = "issued"
        body: dict[str, Any] = {
            "access_token": server.sign(claims),
            "token_type": "Bearer",
            "expires_in": behaviour.expires_in,
        }
        if grant == TOKEN_EXCHANGE:
            body["issued_token_type"] = ACCESS_TOKEN_TYPE
        if form.get("scope"):
            body["scope"] = form["scope"]
        return JSONResponse(body, headers={"cache-control": "no-store"})

    async def jwks(request: Request) -> Response:
        return JSONResponse(KeySet([server.key]).as_dict(private=False))

    async def issue(request: Request) -> Response:
        wanted = await request.json()
        now = int(time.time())
        claims = {
            "iss": server.issuer,
            "sub": wanted["sub"],
            "aud": wanted.get("aud", "mcp-gateway"),
            "iat": now,
            "exp": now + int(wanted.get("expires_in", 300)),
            "jti": uuid.uuid4().hex,
        }
        for extra in ("scope",):
            if extra in wanted:
                claims[extra] = wanted[extra]
        return JSONResponse({"token": server.sign(claims)})

    async def requests(request: Request) -> Response:
        return JSONResponse(server.requests)

    async def behaviour(request: Request) -> Response:
        wanted = await request.json()
        for name in ("expires_in", "fail_status", "delay_s"):
            if name in wanted:
                setattr(server.behaviour, name, wanted[name])
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/token", token, methods=["POST"]),
            Route("/jwks", jwks, methods=["GET"]),
            Route("/issue", issue, methods=["POST"]),
            Route("/admin/requests", requests, methods=["GET"]),
            Route("/admin/behaviour", behaviour, methods=["POST"]),
        ]
    )


async def serve(port: int, clients: dict[str, str], expires_in: int) -> None:
    """Serve until SIGTERM/SIGINT, printing `READY <port>` once connections are accepted."""
    sock = bind_loopback(port)
    state = AuthServer(clients=clients, issuer=f"http://127.0.0.1:{sock.getsockname()[1]}")
    state.behaviour.expires_in = expires_in
    await serve_ready(sock, build_app(state), "oauth_server", lifespan="off")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.oauth_server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client", action="append", default=[], help="client_id:secret (repeatable)")
    parser.add_argument("--expires-in", type=int, default=300, help="lifetime of issued tokens, seconds")
    args = parser.parse_args(argv)
    clients = dict(c.split(":", 1) for c in args.client)
    asyncio.run(serve(args.port, clients, args.expires_in))


if __name__ == "__main__":
    main()
