"""``mcp-extproc consent grant|revoke|list`` on a local resource file.

Through ``extproc.commands.cli.main`` (exit codes, what is printed) and the module's
functions (a fixed clock). The file a user wrote keeps every other document byte for byte,
comments and layout included; a change that would not load is refused and nothing is
written; the rewrite replaces the file atomically and keeps its mode.
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from extproc.commands import consent
from extproc.commands.cli import main
from extproc.config.models import Trust
from extproc.config.resources import Catalog, load_resources
from extproc.errors import ConfigError

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
ALICE = ["--server", "demo", "--user", "alice", "--agent", "ops"]

RESOURCES = """\
# Laptop resources: `mcp-extproc up -f resources.yaml` reloads this file.
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPServer
metadata: {name: demo}      # the demo server
spec:
  url: "http://127.0.0.1:9/mcp"
  allowedTools: ["*"]

--- # the agent, in block style
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPAgent
metadata:
  name: ops
spec:
  mcpServerRefs:
    - name: demo
    - {kind: MCPVirtualServer, name: tools}
  trust: {granted: low}
---
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPVirtualServer
metadata: {name: tools}
spec:
  servers: [{name: demo, prefix: demo_}]
---
# bob decided this one by hand
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPConsent
metadata: {name: bob-by-hand}
spec:
  serverRef: {name: demo}
  subject: {user: bob, agent: ops}
  consentedTrust: low   # bob is careful
---
apiVersion: v1
kind: ConfigMap
metadata: {name: rego}
data:
  policy.rego: |
    package mcp
    default allow := true
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    written = tmp_path / "resources.yaml"
    written.write_text(RESOURCES)
    return written


def run(path: Path, *args: str) -> int:
    return main(["consent", *args, "-f", str(path)])


def consents(path: Path) -> Catalog:
    return load_resources(path)


def others(text: str) -> list[str]:
    """The documents of ``text`` that are no consent, as the user wrote them."""
    return [part for part in consent.split_documents(text) if "kind: MCPConsent" not in part]


def test_grant_creates_a_consent_the_gateway_loads(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(path, "grant", *ALICE, "--trust", "medium") == 0
    assert capsys.readouterr().out == (
        "MCPConsent 'alice-ops-demo-consent': user 'alice', agent 'ops' consents to trust medium on 'demo'\n"
    )
    created = consents(path).consents["alice-ops-demo-consent"].spec
    assert (created.server_ref.kind, created.server_ref.name) == ("MCPServer", "demo")
    assert (created.subject.user, created.subject.agent, created.subject.group) == ("alice", "ops", None)
    assert (created.consented_trust, created.expires_at, created.revoked) == (Trust.MEDIUM, None, False)
    text = path.read_text()
    assert text.startswith(RESOURCES)  # appended: everything before stays as it was
    assert others(text) == others(RESOURCES)


def test_grant_on_a_virtual_server_refers_to_it(path: Path) -> None:
    assert run(path, "grant", "--server", "tools", "--user", "alice", "--agent", "ops", "--trust", "low") == 0
    ref = consents(path).consents["alice-ops-tools-consent"].spec.server_ref
    assert (ref.kind, ref.name) == ("MCPVirtualServer", "tools")


def test_a_second_grant_updates_the_consent_in_place(path: Path) -> None:
    assert run(path, "grant", *ALICE, "--trust", "high", "--expires", "2026-12-31T00:00:00Z") == 0
    first = path.read_text()
    assert run(path, "revoke", *ALICE) == 0
    assert run(path, "grant", *ALICE, "--trust", "low", "--expires", "2027-01-02T03:04:05+02:00") == 0
    catalog = consents(path)
    assert sorted(catalog.consents) == ["alice-ops-demo-consent", "bob-by-hand"]  # no second document
    spec = catalog.consents["alice-ops-demo-consent"].spec
    assert (spec.consented_trust, spec.revoked) == (Trust.LOW, False)
    assert spec.expires_at == datetime(2027, 1, 2, 1, 4, 5, tzinfo=UTC)  # replaced, in UTC
    assert "expiresAt: '2027-01-02T01:04:05Z'" in path.read_text()
    # Without --expires, the expiry is dropped: the consent no longer lapses.
    assert run(path, "grant", *ALICE, "--trust", "low") == 0
    assert consents(path).consents["alice-ops-demo-consent"].spec.expires_at is None
    # It stayed where it was: the same number of documents, in the same order.
    assert len(consent.split_documents(path.read_text())) == len(consent.split_documents(first))
    assert others(path.read_text()) == others(RESOURCES)


def test_grant_of_a_hand_written_consent_keeps_its_name_and_subject(path: Path) -> None:
    assert run(path, "grant", "--name", "bob-by-hand", "--trust", "medium") == 0
    spec = consents(path).consents["bob-by-hand"].spec
    assert (spec.subject.user, spec.subject.agent, spec.consented_trust) == ("bob", "ops", Trust.MEDIUM)
    # The same consent picked by its server, user and agent.
    assert run(path, "grant", "--server", "demo", "--user", "bob", "--agent", "ops", "--trust", "high") == 0
    assert consents(path).consents["bob-by-hand"].spec.consented_trust is Trust.HIGH
    assert sorted(consents(path).consents) == ["bob-by-hand"]
    assert others(path.read_text()) == others(RESOURCES)


def test_revoke_sets_revoked(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(path, "revoke", "--server", "demo", "--user", "bob", "--agent", "ops") == 0
    assert capsys.readouterr().out == (
        "MCPConsent 'bob-by-hand': revoked; calls it covers are refused from the next reload\n"
    )
    spec = consents(path).consents["bob-by-hand"].spec
    assert (spec.revoked, spec.consented_trust) == (True, Trust.LOW)
    assert others(path.read_text()) == others(RESOURCES)


def test_revoke_of_no_such_consent_is_exit_2(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(path, "revoke", *ALICE) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcp-extproc: error: the MCPConsent of server 'demo', user 'alice', agent 'ops' is not in ")
    assert err.count("\n") == 1
    assert path.read_text() == RESOURCES


def test_list_shows_live_expired_and_revoked(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(path, "grant", *ALICE, "--trust", "high", "--expires", "2020-01-01T00:00:00Z") == 0
    assert run(path, "grant", "--server", "demo", "--user", "carol", "--agent", "ops", "--trust", "medium") == 0
    assert run(path, "revoke", "--server", "demo", "--user", "carol", "--agent", "ops") == 0
    capsys.readouterr()
    assert run(path, "list") == 0
    assert capsys.readouterr().out == (
        "NAME                    SERVER  USER   AGENT  TRUST   EXPIRES                    STATE\n"
        "alice-ops-demo-consent  demo    alice  ops    high    2020-01-01T00:00:00+00:00  expired\n"
        "bob-by-hand             demo    bob    ops    low     -                          live\n"
        "carol-ops-demo-consent  demo    carol  ops    medium  -                          revoked\n"
    )


def test_list_on_the_clock(path: Path) -> None:
    expires = NOW + timedelta(hours=8)
    consent.grant(path, consent.Wanted("demo", "alice", "ops"), Trust.HIGH, expires)
    assert "live" in consent.listing(path, now=expires - timedelta(seconds=1)).splitlines()[1]
    assert consent.listing(path, now=expires).splitlines()[1].endswith("expired")


def test_list_of_a_file_without_consents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text(RESOURCES.split("---")[0])
    assert run(bare, "list") == 0
    assert capsys.readouterr().out == f"{bare}: no MCPConsent documents\n"


def test_a_grant_that_would_not_load_is_refused_and_nothing_is_written(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = path.stat()
    assert run(path, "grant", "--server", "ghost", "--user", "alice", "--agent", "ops", "--trust", "high") == 2
    err = capsys.readouterr().err
    assert err == (
        f"mcp-extproc: error: {path}: MCPConsent 'alice-ops-ghost-consent': spec.serverRef: "
        "no MCPServer named 'ghost'\n"
    )
    assert path.read_text() == RESOURCES
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in path.parent.iterdir()) == ["resources.yaml"]


def test_grant_needs_trust_and_a_subject(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(path, "grant", *ALICE) == 2
    assert capsys.readouterr().err == "mcp-extproc: error: consent grant needs --trust low|medium|high\n"
    assert run(path, "grant", "--server", "demo", "--trust", "low") == 2
    assert "give --server and --user and/or --agent" in capsys.readouterr().err
    assert path.read_text() == RESOURCES


def test_a_new_consent_whose_default_name_is_taken_is_refused(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(path, "grant", "--server", "demo", "--user", "dave", "--name", "bob-by-hand", "--trust", "low") == 0
    # --name picks bob's consent: it is changed, not a second one made for dave.
    assert consents(path).consents["bob-by-hand"].spec.subject.user == "bob"
    assert sorted(consents(path).consents) == ["bob-by-hand"]
    capsys.readouterr()
    # The name made of user, agent and server is already another subject's.
    assert run(path, "grant", "--server", "demo", "--user", "x", "--agent", "y", "--trust", "low") == 0
    before = path.read_text()
    assert run(path, "grant", "--server", "demo", "--user", "X", "--agent", "y", "--trust", "low") == 2
    assert (
        "already has an MCPConsent named 'x-y-demo-consent' for another subject; pass --name" in capsys.readouterr().err
    )
    assert path.read_text() == before


TWIN = """\
---
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPConsent
metadata: {name: bob-twin}
spec:
  serverRef: {kind: MCPServer, name: demo}
  subject: {user: bob, agent: ops}
  consentedTrust: high
"""


def test_an_ambiguous_consent_needs_a_name(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path.write_text(RESOURCES + TWIN)
    assert sorted(consents(path).consents) == ["bob-by-hand", "bob-twin"]
    for action in (["revoke"], ["grant", "--trust", "low"]):
        assert run(path, *action, "--server", "demo", "--user", "bob", "--agent", "ops") == 2
        assert "is ambiguous: ['bob-by-hand', 'bob-twin']; pass --name" in capsys.readouterr().err
        assert path.read_text() == RESOURCES + TWIN
    assert run(path, "revoke", "--name", "bob-twin") == 0
    assert [c.spec.revoked for _, c in sorted(consents(path).consents.items())] == [False, True]
    assert path.read_text().startswith(RESOURCES)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8h", NOW + timedelta(hours=8)),
        ("30m", NOW + timedelta(minutes=30)),
        ("7d", NOW + timedelta(days=7)),
        ("45s", NOW + timedelta(seconds=45)),
        ("2026-12-31T00:00:00Z", datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T09:00:00+09:00", datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T00:00:00.5-05:00", datetime(2026, 12, 31, 5, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_expires_accepts_durations_and_zoned_times(value: str, expected: datetime) -> None:
    found = consent.expiry(value, NOW)
    assert found == expected and found is not None and found.utcoffset() is not None


def test_a_duration_counts_from_now_in_whole_seconds() -> None:
    found = consent.expiry("8h", NOW + timedelta(microseconds=700))
    assert found == NOW + timedelta(hours=8)
    assert consent.expiry(None, NOW) is None


@pytest.mark.parametrize("value", ["tomorrow", "2026-12-31T00:00:00", "2026-12-31", "8 h", "1.5h", "-8h", "8w", ""])
def test_expires_refuses_what_is_no_zoned_time_nor_duration(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        consent.expiry(value, NOW)
    assert str(caught.value) == (
        f"--expires {value!r}: give an RFC 3339 time with a zone (2026-12-31T00:00:00Z) or a duration (8h, 7d)"
    )


@pytest.mark.parametrize("value", ["tomorrow", "2026-12-31T00:00:00"])
def test_a_bad_expires_is_exit_2_and_writes_nothing(path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert run(path, "grant", *ALICE, "--trust", "high", "--expires", value) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mcp-extproc: error: --expires {value!r}: give an RFC 3339 time with a zone")
    assert err.count("\n") == 1
    assert path.read_text() == RESOURCES


def test_a_duration_through_the_command_is_from_now(path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    assert run(path, "grant", *ALICE, "--trust", "high", "--expires", "8h") == 0
    after = datetime.now(UTC)
    expires = consents(path).consents["alice-ops-demo-consent"].spec.expires_at
    assert expires is not None and before + timedelta(hours=8) <= expires <= after + timedelta(hours=8)
    assert expires.utcoffset() == timedelta(0)


@pytest.mark.parametrize("action", ["grant", "revoke", "list"])
def test_a_missing_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str) -> None:
    missing = tmp_path / "nope.yaml"
    extra = [*ALICE, "--trust", "low"] if action == "grant" else ALICE if action == "revoke" else []
    assert run(missing, action, *extra) == 2
    assert capsys.readouterr().err == f"mcp-extproc: error: {missing}: No such file or directory\n"
    assert not missing.exists()


def test_the_rewrite_is_atomic_and_keeps_the_mode(path: Path) -> None:
    path.chmod(0o640)
    for args in (["grant", *ALICE, "--trust", "high"], ["revoke", *ALICE]):
        inode = path.stat().st_ino
        assert run(path, *args) == 0
        assert path.stat().st_ino != inode  # replaced by a rename, never written in place
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["resources.yaml"]  # no temporary file left


def test_a_failed_write_leaves_the_file_and_no_temporary(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    assert run(path, "grant", *ALICE, "--trust", "high") == 2
    assert path.read_text() == RESOURCES
    assert sorted(p.name for p in path.parent.iterdir()) == ["resources.yaml"]


def test_a_consent_that_is_the_first_document_stays_first_without_a_separator(tmp_path: Path) -> None:
    parts = consent.split_documents(RESOURCES)
    bob = next(p for p in parts if "bob-by-hand" in p).removeprefix("---\n")
    rest = [p for p in parts if "bob-by-hand" not in p]
    path = tmp_path / "resources.yaml"
    path.write_text(bob + "---\n" + "".join(rest))
    before = path.read_text()
    assert run(path, "revoke", "--name", "bob-by-hand") == 0
    text = path.read_text()
    assert text.startswith("apiVersion: mcp.extproc.io/v1alpha1\nkind: MCPConsent\n")
    assert consents(path).consents["bob-by-hand"].spec.revoked is True
    assert others(text) == others(before)


def test_a_crlf_file_keeps_its_line_endings(path: Path) -> None:
    crlf = RESOURCES.replace("\n", "\r\n").encode()
    path.write_bytes(crlf)
    assert run(path, "grant", *ALICE, "--trust", "high") == 0
    assert path.read_bytes().startswith(crlf)
