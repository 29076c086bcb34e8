"""The email service's transport against real SMTP servers: STARTTLS and AUTH required, TLS from
the first byte, a wrong password (failed, never echoed), and ``kill -9`` of the server process in
the middle of 5,000 recipients: every recipient ends sent, and only messages in flight at the
kill (at most one per SMTP connection) reach the server twice, each with its first Message-ID."""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from fastapi import FastAPI

from conveyor.service import create_app

from .support.live import LiveServer, follow, free_port, read_events, service_settings
from .support.process import start_server
from .support.smtp_server import SmtpServer, message

pytestmark = pytest.mark.timeout(300)

USER, PASSWORD = "mailer", "s3cret-Pa55"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The server side's TLS context; clients in this process trust its CA (``SSL_CERT_FILE``,
    read by OpenSSL when a client context is made)."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@pytest.fixture
def secured(trusted: ssl.SSLContext) -> Iterator[SmtpServer]:
    """STARTTLS required before anything, AUTH required (and only over TLS)."""
    with SmtpServer(
        tls_context=trusted,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticator,
    ) as server:
        yield server


def client_for(serve: Callable[[FastAPI], LiveServer], tmp_path: Path, url: str) -> httpx.Client:
    settings = service_settings(
        tmp_path, smtp_url=url, smtp_from="news@example.com", retry_base_s=0, email_retries=1
    )
    return serve(create_app(settings)).client()


def test_starttls_and_auth(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, secured: SmtpServer
) -> None:
    url = f"smtp://{USER}:{PASSWORD}@127.0.0.1:{secured.port}?starttls=required"
    with client_for(serve, tmp_path, url) as client:
        recipients = [{"email": "ann@example.com"}, {"email": "bob@example.com"}]
        email = client.post("/emails", json=message(text="Hi", recipients=recipients)).json()
        final, _ = follow(client, email["id"], kind="emails")
        assert final["counts"]["sent"] == 2, final
    assert len(secured.handler.wait_for(2)) == 2
    assert secured.handler.sessions == [(True, USER)] * 2, "each message over TLS, logged in"


def test_a_wrong_password_fails_and_is_never_echoed(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, secured: SmtpServer
) -> None:
    url = f"smtp://{USER}:wrong-{PASSWORD}@127.0.0.1:{secured.port}?starttls=required"
    with client_for(serve, tmp_path, url) as client:
        email = client.post("/emails", json=message(text="Hi")).json()
        final, events = follow(client, email["id"], kind="emails")
        assert final["counts"]["failed"] == 1, final
        row = client.get(f"/emails/{email['id']}/recipients").json()["items"][0]
        assert row["attempts"] == 2 and "authentication failed" in row["smtp_reply"]
        seen = [
            str(events),
            str(final),
            client.get(f"/emails/{email['id']}/recipients").text,
            client.get(f"/emails/{email['id']}/recipients.csv").text,
            client.get(f"/tasks/{row['task_id']}").text,
            client.get("/openapi.json").text,
        ]
        assert not [text for text in seen if PASSWORD in text], "the password is never echoed"
    assert secured.handler.received == []


def test_tls_from_the_first_byte(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, trusted: ssl.SSLContext
) -> None:
    with SmtpServer(ssl_context=trusted) as server:
        with client_for(serve, tmp_path, f"smtps://127.0.0.1:{server.port}") as client:
            email = client.post("/emails", json=message(text="Hi")).json()
            assert follow(client, email["id"], kind="emails")[0]["counts"]["sent"] == 1
        assert server.handler.sessions == [(True, None)]


def test_kill_9_mid_email_sends_each_recipient_once_but_the_window(
    spawn: Any, tmp_path: Path, smtp: SmtpServer
) -> None:
    count, connections = 5000, 4
    env = {
        "CONVEYOR_SMTP_URL": smtp.url,
        "CONVEYOR_SMTP_FROM": "news@example.com",
        "CONVEYOR_SMTP_CONNECTIONS": str(connections),
    }
    port = free_port()
    server = start_server(spawn, port, **env)
    recipients = [{"email": f"r{i}@example.com", "vars": {"n": i}} for i in range(count)]
    body = message(subject="Note {{ n }}", text="Number {{ n }}", recipients=recipients)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        created = client.post("/emails", json=body)
        assert created.status_code == 202, created.text
        email = created.json()
        smtp.handler.wait_for(count // 4)
        server.kill()
    port = free_port()
    start_server(spawn, port, **env)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        events = read_events(client, f"/emails/{email['id']}/events")
        final = events[-1][1]
        assert final["status"] == "finished"
        assert final["counts"]["sent"] == count, final["counts"]

    received = smtp.handler.received
    by_address = Counter(rcpts[0] for rcpts, _ in received)
    assert set(by_address) == {f"r{i}@example.com" for i in range(count)}, "none lost"
    twice = {address: n for address, n in by_address.items() if n > 1}
    assert set(twice.values()) <= {2}
    assert len(twice) <= connections, f"only the sends in flight at the kill: {twice}"
    ids: dict[str, set[str]] = {}
    for rcpts, msg in received:
        ids.setdefault(rcpts[0], set()).add(str(msg["Message-ID"]))
    assert all(len(found) == 1 for found in ids.values()), "a resend keeps its Message-ID"
    assert len({next(iter(found)) for found in ids.values()}) == count
