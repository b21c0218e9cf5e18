"""``mcp-extproc consent grant|revoke|list``: ``MCPConsent`` documents in a local resource file.

The running ``up`` or ``serve`` reloads the file within its reload interval, so a
laptop user can lower, raise, revoke or let lapse a consent and watch calls change::

    file ──split at "---" lines──▶ document texts (kept byte for byte)
         ──▶ grant:  the consent of (server, user, agent), or --name, rewritten in place
                     (revoked: false), else a new document appended
             revoke: that consent rewritten with revoked: true
             list:   a table (name, server, user, agent, trust, expires, state)
         ──▶ the new text parsed as the server would (parse_documents + reference_problems):
             refused with the loader's message if it would not load
         ──▶ written atomically (a temporary file beside it, then renamed)

Only the consent document changed is re-serialized; every other document, its comments
and its formatting stay as they were.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import yaml

from extproc.config import strict_yaml
from extproc.config.models import API_VERSION, MCPConsent, Trust
from extproc.config.resources import Catalog, load_text
from extproc.errors import ConfigError

_SEPARATOR: Final = re.compile(r"^---[ \t]*(#[^\r\n]*)?\r?$", re.MULTILINE)
_DURATION: Final = re.compile(r"^(\d+)([smhd])$")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class Wanted:
    """The consent a command means: by name, or by server, user and agent."""

    server: str | None = None
    user: str | None = None
    agent: str | None = None
    name: str | None = None

    def picks(self, consent: MCPConsent) -> bool:
        """True when ``consent`` is the one meant."""
        if self.name is not None:
            return consent.name == self.name
        subject = consent.spec.subject
        return (consent.spec.server_ref.name, subject.user, subject.agent) == (self.server, self.user, self.agent)

    def shown(self) -> str:
        if self.name is not None:
            return f"MCPConsent {self.name!r}"
        return f"the MCPConsent of server {self.server!r}, user {self.user!r}, agent {self.agent!r}"


def split_documents(text: str) -> list[str]:
    """The file's documents as texts, each starting at its ``---`` line (the first may have none)."""
    starts = [m.start() for m in _SEPARATOR.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _load(path: Path) -> tuple[str, Catalog]:
    try:
        with path.open(encoding="utf-8", newline="") as source:  # CRLF files stay CRLF
            text = source.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return text, load_text(text, str(path))


def _consent_of(text: str) -> str | None:
    """The name of the MCPConsent ``text`` (one document) holds, if it holds one."""
    try:
        doc = strict_yaml.load_all(text)
    except yaml.YAMLError:
        return None
    found = [d for d in doc if isinstance(d, dict)]
    if len(found) != 1 or found[0].get("kind") != "MCPConsent":
        return None
    name = (found[0].get("metadata") or {}).get("name")
    return name if isinstance(name, str) else None


def expiry(value: str | None, now: datetime) -> datetime | None:
    """``--expires``: an RFC 3339 time with a zone, or a duration from now (``30m``, ``8h``, ``7d``).

    Raises:
        ConfigError: neither.
    """
    if value is None:
        return None
    duration = _DURATION.match(value)
    if duration:
        later = now + timedelta(**{_UNITS[duration.group(2)]: int(duration.group(1))})
        return later.replace(microsecond=0)
    try:
        moment: datetime | None = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ConfigError(
            f"--expires {value!r}: give an RFC 3339 time with a zone (2026-12-31T00:00:00Z) or a duration (8h, 7d)"
        )
    return moment


def _name_for(wanted: Wanted) -> str:
    raw = "-".join(p for p in (wanted.user, wanted.agent, wanted.server, "consent") if p)
    label = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:63].strip("-")
    return label or "consent"


def _document(name: str, namespace: str | None, spec: dict[str, Any], separated: bool) -> str:
    metadata: dict[str, Any] = {"name": name}
    if namespace and namespace != "default":
        metadata["namespace"] = namespace
    body = yaml.safe_dump(
        {"apiVersion": API_VERSION, "kind": "MCPConsent", "metadata": metadata, "spec": spec}, sort_keys=False
    )
    return ("---\n" if separated else "") + body


def _write(path: Path, text: str) -> None:
    load_text(text, str(path))
    path = path.resolve()  # a symlinked file: its target is rewritten, the link stays
    mode = path.stat().st_mode & 0o777
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _replace(path: Path, text: str, name: str, new: str) -> None:
    parts = split_documents(text)
    index = next(i for i, part in enumerate(parts) if _consent_of(part) == name)
    separated = bool(_SEPARATOR.match(parts[index]))
    parts[index] = new if separated else new.removeprefix("---\r\n").removeprefix("---\n")
    _write(path, "".join(parts))


def grant(path: Path, wanted: Wanted, trust: Trust, expires: datetime | None) -> str:
    """Record (or change) a consent; what to print.

    Raises:
        ConfigError: the file would not load afterwards, or the consent is not named well enough.
    """
    text, catalog = _load(path)
    found = [c for c in catalog.consents.values() if wanted.picks(c)]
    if len(found) > 1:
        raise ConfigError(f"{wanted.shown()} is ambiguous: {sorted(c.name for c in found)}; pass --name")
    if found:
        old = found[0]
        server_ref = old.spec.server_ref.model_dump(by_alias=True)
        subject = old.spec.subject.model_dump(by_alias=True, exclude_none=True)
        name, namespace = old.name, old.metadata.namespace
    else:
        if wanted.server is None or (wanted.user is None and wanted.agent is None):
            raise ConfigError(f"{wanted.shown()} is not in {path}; give --server and --user and/or --agent")
        kind = "MCPVirtualServer" if wanted.server in catalog.virtual_servers else "MCPServer"
        server_ref = {"kind": kind, "name": wanted.server}
        subject = {k: v for k, v in (("user", wanted.user), ("agent", wanted.agent)) if v}
        name, namespace = wanted.name or _name_for(wanted), None
        if name in catalog.consents:
            raise ConfigError(f"{path} already has an MCPConsent named {name!r} for another subject; pass --name")
    spec: dict[str, Any] = {"serverRef": server_ref, "subject": subject, "consentedTrust": trust.value}
    if expires is not None:
        spec["expiresAt"] = expires.astimezone(UTC).isoformat().replace("+00:00", "Z")
    spec["revoked"] = False
    new = _lines_of(text, _document(name, namespace, spec, separated=True))
    if found:
        _replace(path, text, name, new)
    else:
        joined = text if text.endswith("\n") or not text else text + _lines_of(text, "\n")
        _write(path, joined + new)
    until = f" until {spec['expiresAt']}" if expires is not None else ""
    return f"MCPConsent {name!r}: {_who(subject)} consents to trust {trust.value} on {server_ref['name']!r}{until}\n"


def revoke(path: Path, wanted: Wanted) -> str:
    """Revoke a consent; what to print.

    Raises:
        ConfigError: no such consent, or the file would not load afterwards.
    """
    text, catalog = _load(path)
    found = [c for c in catalog.consents.values() if wanted.picks(c)]
    if not found:
        raise ConfigError(f"{wanted.shown()} is not in {path}; `consent list -f {path}` shows what is")
    if len(found) > 1:
        raise ConfigError(f"{wanted.shown()} is ambiguous: {sorted(c.name for c in found)}; pass --name")
    consent = found[0]
    spec = consent.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec["subject"] = consent.spec.subject.model_dump(by_alias=True, exclude_none=True)
    spec["revoked"] = True
    new = _lines_of(text, _document(consent.name, consent.metadata.namespace, spec, separated=True))
    _replace(path, text, consent.name, new)
    return f"MCPConsent {consent.name!r}: revoked; calls it covers are refused from the next reload\n"


def state_of(consent: MCPConsent, now: datetime) -> str:
    """``revoked``, ``expired`` or ``live``."""
    if consent.spec.revoked:
        return "revoked"
    return "expired" if consent.expired(now) else "live"


def listing(path: Path, now: datetime | None = None) -> str:
    """Every consent of the file, one line each."""
    _, catalog = _load(path)
    moment = now or datetime.now(UTC)
    rows = [("NAME", "SERVER", "USER", "AGENT", "TRUST", "EXPIRES", "STATE")]
    for name, consent in sorted(catalog.consents.items()):
        spec = consent.spec
        expires = spec.expires_at.isoformat() if spec.expires_at is not None else "-"
        rows.append(
            (
                name,
                spec.server_ref.name,
                spec.subject.user or "-",
                spec.subject.agent or "-",
                spec.consented_trust.value,
                expires,
                state_of(consent, moment),
            )
        )
    if len(rows) == 1:
        return f"{path}: no MCPConsent documents\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)


def _lines_of(text: str, new: str) -> str:
    """``new`` with the line endings of ``text`` (a CRLF file stays CRLF)."""
    return new.replace("\n", "\r\n") if "\r\n" in text else new


def _who(subject: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in subject.items())


__all__ = ["Wanted", "expiry", "grant", "listing", "revoke", "split_documents", "state_of"]
