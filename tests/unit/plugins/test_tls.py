"""The stages' outbound clients share one TLS context instead of loading the CA bundle each."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest

from plugins.lib import tls
from plugins.session import SessionConfig, SessionStage


@pytest.fixture(autouse=True)
def _fresh_contexts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    tls.client_context.cache_clear()
    yield
    tls.client_context.cache_clear()


def test_one_context_verifies_with_certifi_whatever_trust_env_says() -> None:
    context = tls.client_context()
    assert context is tls.client_context(trust_env=False)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0


def test_ssl_cert_file_is_honoured_only_with_trust_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert tls.client_context() is not tls.client_context(trust_env=False)
    assert tls.client_context() is tls.client_context()


async def test_the_session_keepers_clients_share_it() -> None:
    stage = SessionStage(SessionConfig())
    try:
        pools = [stage._client._transport, stage._answers._transport]
        contexts = {id(pool._pool._ssl_context) for pool in pools if isinstance(pool, httpx.AsyncHTTPTransport)}
        assert contexts == {id(tls.client_context())}
    finally:
        await stage._client.aclose()
        await stage._answers.aclose()
