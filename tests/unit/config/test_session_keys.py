"""The session key set file: created 0600 when missing, rotated without losing old keys,
refused with the file named when malformed, never printed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from extproc.commands.cli import main
from extproc.config.session_keys import default_key_file, load_key_set, parse_key_set, rotate_key_set
from extproc.errors import ConfigError
from plugins.lib.session_ids import BadSessionId, SessionIds


def test_a_missing_file_is_created_owner_only_and_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.json"
    first = load_key_set(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_key_set(path, create=True)
    assert again.signing == first.signing and again.persistent
    secret = first.signing.secret
    assert secret.hex() not in repr(first) and str(secret) not in repr(first)  # never printed


def test_without_create_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such session key file"):
        load_key_set(tmp_path / "absent.json", create=False)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not JSON"),
        ("{}", "not a session key set"),
        ('{"keys": []}', "at least one key"),
        ('{"keys": [{"kty": "RSA", "kid": "a", "k": "x"}]}', "symmetric key"),
        ('{"keys": [{"kty": "oct", "k": "' + "A" * 43 + '"}]}', '"kid" is missing'),
        ('{"keys": [{"kty": "oct", "kid": "a", "k": "AAAA"}]}', "the key is 24 bits; at least 256"),
        (
            '{"keys": [{"kty": "oct", "kid": "a", "k": "'
            + "A" * 43
            + '"}, {"kty": "oct", "kid": "a", "k": "'
            + "B" * 43
            + '"}]}',
            "kid 'a' is used twice",
        ),
    ],
)
def test_a_malformed_key_set_is_refused_naming_the_file(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(document)
    with pytest.raises(ConfigError, match=message) as raised:
        load_key_set(path, create=False)
    assert str(path) in str(raised.value)
    assert "B" * 43 not in str(raised.value) and "A" * 43 not in str(raised.value)


def test_rotation_puts_a_new_signing_key_first_and_old_ids_still_verify(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    before = load_key_set(path, create=True)
    token = SessionIds(before).mint("up-1", "demo", "iss|alice", None)
    kids = [rotate_key_set(path) for _ in range(3)]
    after = load_key_set(path, create=False)
    assert after.signing.kid == kids[-1] and len(after.by_kid) == 3  # three kept in all
    assert before.signing.kid not in after.by_kid  # the oldest fell out after three rotations
    with pytest.raises(BadSessionId, match="unknown_key"):
        SessionIds(after).verify(token, "demo")
    once = tmp_path / "once.json"
    old = load_key_set(once, create=True)
    rotate_key_set(once)
    rotated = load_key_set(once, create=False)
    claims = SessionIds(rotated).verify(SessionIds(old).mint("up-2", "demo", "iss|bob", "ops"), "demo")
    assert (claims.upstream_id, claims.principal, claims.agent) == ("up-2", "iss|bob", "ops")


def test_ids_are_checked_for_server_and_cached_only_until_they_expire() -> None:
    now = [1_000_000.0]
    ids = SessionIds(parse_key_set(json.loads(json.dumps({"keys": [_key("k1")]})), "test"), clock=lambda: now[0])
    token = ids.mint("up-1", "demo", "iss|alice", None)
    assert ids.verify(token, "demo").upstream_id == "up-1"
    with pytest.raises(BadSessionId, match="other_server"):
        ids.verify(token, "other")
    assert ids.verify(token, "demo").upstream_id == "up-1"  # cached now
    now[0] += ids.max_age_s + 1
    with pytest.raises(BadSessionId, match="expired"):
        ids.verify(token, "demo")  # the cache re-checks expiry


def _key(kid: str) -> dict[str, str]:
    return {"kty": "oct", "kid": kid, "alg": "HS256", "k": "A" * 43}


def test_the_state_directory_follows_xdg_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_key_file() == tmp_path / "mcp-extproc" / "session-keys.json"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert (
        default_key_file() == Path(os.path.expanduser("~")) / ".local" / "state" / "mcp-extproc" / "session-keys.json"
    )


def test_the_session_keys_command_prints_a_new_set_and_rotates_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["session-keys", "new"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert parse_key_set(printed, "stdout").signing.kid == printed["keys"][0]["kid"]
    path = tmp_path / "keys.json"
    assert main(["session-keys", "rotate", str(path)]) == 0
    assert "new signing key" in capsys.readouterr().out and load_key_set(path, create=False)
    assert main(["session-keys", "rotate"]) == 2
    assert "name the key file" in capsys.readouterr().err
    path.write_text("{}")
    assert main(["session-keys", "rotate", str(path)]) == 2
    assert "not a session key set" in capsys.readouterr().err
