"""The session key set: the keys the gateway signs its legacy ``Mcp-Session-Id`` values with.

A key set is a JSON Web Key Set (RFC 7517) of symmetric ``oct`` keys for HS256::

    {"keys": [{"kty": "oct", "kid": "s-20261202-3f9a1c0e", "alg": "HS256", "use": "sig", "k": "<base64url>"}]}

The **first** key signs; every key verifies. To rotate without dropping sessions, put a
new key first and keep the old ones until the sessions they signed have ended
(``mcp-extproc session-keys rotate FILE`` does it). Any process holding the file can serve
any session: ``up`` after a restart, every replica of ``serve``, Envoy's ``jwt_authn``
given the same set as a local JWKS.

Data flow::

    --session-key-file FILE ─▶ load_key_set(FILE, create=True)
        missing ─▶ new_key_set() written with mode 0600 (the directory made 0700)
        present ─▶ parsed; ConfigError naming the file on anything malformed
    no file at all (``serve`` without the flag) ─▶ SessionKeys.ephemeral(): one key in memory
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.errors import ConfigError

ALGORITHM = "HS256"
KEY_BYTES = 32
"""256-bit keys: HS256's full strength."""


def new_key() -> dict[str, str]:
    """A fresh signing key as a JWK (``kid`` says when it was made)."""
    raw = secrets.token_bytes(KEY_BYTES)
    kid = f"s-{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(4)}"
    return {
        "kty": "oct",
        "kid": kid,
        "alg": ALGORITHM,
        "use": "sig",
        "k": base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"),
    }


def new_key_set() -> dict[str, list[dict[str, str]]]:
    """A key set holding one fresh key."""
    return {"keys": [new_key()]}


@dataclass(frozen=True)
class SessionKey:
    """One key of the set: its id and its secret bytes."""

    kid: str
    secret: bytes

    def __repr__(self) -> str:  # never print the secret
        return f"SessionKey(kid={self.kid!r})"


@dataclass(frozen=True)
class SessionKeys:
    """A parsed key set: ``signing`` signs, every key in ``by_kid`` verifies.

    Attributes:
        signing: the first key of the set.
        by_kid: every key, by its ``kid``.
        source: where the set came from (a path, or ``"memory"``), for messages.
    """

    signing: SessionKey
    by_kid: dict[str, SessionKey]
    source: str

    @property
    def persistent(self) -> bool:
        """False for a set held only in this process's memory."""
        return self.source != "memory"

    @classmethod
    def ephemeral(cls) -> SessionKeys:
        """A one-key set that lives as long as this process."""
        return parse_key_set(new_key_set(), "memory")


class BadToken(Exception):
    """A token signed (or not) with a key set that must not be accepted; ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_signed(keys: SessionKeys, token: str, *, audience: str, issuer: str, require: list[str]) -> dict[str, Any]:
    """The payload of ``token``, an HS256 JWS by a key of ``keys`` for ``audience`` from ``issuer``.

    Expiry is left to the caller (on its own clock). The session ids and the report
    tokens (:mod:`extproc.core.report`) are both checked here.

    Raises:
        BadToken: ``malformed``, ``unknown_key`` (no such ``kid`` in the set),
            ``other_audience`` or ``bad_signature``.
    """
    import jwt  # only once a token is checked (PyJWT costs memory: see plugins.lib.session_ids)

    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise BadToken("malformed") from None
    key = keys.by_kid.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise BadToken("unknown_key")
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key.secret,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={"require": require, "verify_exp": False, "verify_iat": False},
        )
    except jwt.InvalidAudienceError:
        raise BadToken("other_audience") from None
    except jwt.InvalidSignatureError:
        raise BadToken("bad_signature") from None
    except jwt.InvalidTokenError:
        raise BadToken("malformed") from None
    return payload


def _b64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def parse_key_set(document: Any, source: str) -> SessionKeys:
    """A :class:`SessionKeys` from a parsed JWKS document.

    Raises:
        ConfigError: naming ``source`` and what is wrong (never a key's bytes).
    """
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f'{source}: not a session key set: expected {{"keys": [...]}} with at least one key')
    parsed: list[SessionKey] = []
    for index, jwk in enumerate(keys):
        where = f"{source}: keys[{index}]"
        if not isinstance(jwk, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        if jwk.get("kty") != "oct" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            raise ConfigError(f'{where}: expected a symmetric key ("kty": "oct", "alg": "{ALGORITHM}")')
        kid, k = jwk.get("kid"), jwk.get("k")
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f'{where}: "kid" is missing')
        if not isinstance(k, str):
            raise ConfigError(f'{where}: "k" is missing')
        try:
            secret = _b64(k)
        except ValueError:
            raise ConfigError(f'{where}: "k" is not base64url') from None
        if len(secret) < KEY_BYTES:
            raise ConfigError(f"{where}: the key is {len(secret) * 8} bits; at least {KEY_BYTES * 8} are needed")
        if any(p.kid == kid for p in parsed):
            raise ConfigError(f"{where}: kid {kid!r} is used twice")
        parsed.append(SessionKey(kid, secret))
    return SessionKeys(parsed[0], {p.kid: p for p in parsed}, source)


def write_private_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as JSON, atomically, readable by its owner only (mode 0600; a new
    directory gets 0700): the key set here, the tool pins (:mod:`extproc.config.pins_file`)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def load_key_set(path: Path, *, create: bool) -> SessionKeys:
    """Read the key set at ``path``; with ``create``, make one when the file does not exist.

    Raises:
        ConfigError: the file cannot be read or written, or is not a key set.
    """
    return parse_key_set(_read_document(path, create=create), str(path))


def _read_document(path: Path, *, create: bool) -> Any:
    """The JSON document at ``path`` (a new key set written there first, with ``create``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"{path}: no such session key file") from None
        try:
            write_private_json(path, new_key_set())
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot create the session key file: {exc.strerror or exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the session key file: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{path}: not JSON (expected a JSON Web Key Set)") from None


def rotate_key_set(path: Path, keep: int = 3) -> str:
    """Put a fresh key first in the set at ``path`` (created when missing); keep ``keep`` keys in all.

    Returns the new key's ``kid``.

    Raises:
        ConfigError: the file at ``path`` is not a key set (it is left as it is).
    """
    document: dict[str, Any] = {"keys": []}
    if path.exists():
        document = _read_document(path, create=False)
        parse_key_set(document, str(path))  # refuse to rotate a malformed set
    key = new_key()
    document["keys"] = [key, *document["keys"]][: max(1, keep)]
    write_private_json(path, document)
    return key["kid"]


def default_key_file() -> Path:
    """Where ``up`` keeps its key set: ``$XDG_STATE_HOME/mcp-extproc/session-keys.json``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mcp-extproc" / "session-keys.json"
