"""The email service against a real SMTP server (aiosmtpd on loopback): per-recipient rendering
and status, 4xx deferred and retried, 5xx bounced, a connection dropped mid-DATA, duplicates sent
once, hostile input refused before anything is committed, tenants kept apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from email_validator import EmailNotValidError, validate_email
from fastapi import FastAPI
from pydantic import ValidationError

from conveyor import Settings
from conveyor.jobs.email import (
    Bounced,
    Deferred,
    EmailInputError,
    build_message,
    parse_smtp_url,
    send_email,
    valid_address,
)
from conveyor.service import create_app

from .support.faults import wait_until
from .support.live import LiveServer, counted, follow, read_events, service_settings
from .support.smtp_server import SmtpServer, message

pytestmark = pytest.mark.timeout(120)


def test_each_recipient_gets_its_own_message(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    recipients = [
        {"email": "ann@example.com", "name": "Ann", "vars": {"code": "A1"}},
        {"email": "ase@example.com", "name": "Åse Ødegård", "vars": {"code": "<b>&"}},
        {"email": "bob@example.com", "vars": {"code": "B3"}},
    ]
    body = message(
        recipients=recipients,
        subject="Héllo {{ name }} ✓",
        html="<p>Hi <i>{{ name }}</i>: {{ code }}</p>",
        reply_to="help@example.com",
        headers={"List-Unsubscribe": "<mailto:unsub@example.com>"},
    )
    created = client.post("/emails", json=body)
    assert created.status_code == 202, created.text
    sent = created.json()
    assert created.headers["location"] == f"/emails/{sent['id']}"
    assert sent["total"] == 3 and sent["counts"]["queued"] + sent["counts"]["sending"] <= 3

    final, events = follow(client, sent["id"], kind="emails")
    assert final["status"] == "finished"
    assert final["counts"] == {
        "queued": 0,
        "sending": 0,
        "sent": 3,
        "deferred": 0,
        "bounced": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert events[-1][1]["counts"]["sent"] == 3

    page = client.get(f"/emails/{sent['id']}/recipients").json()
    by_address = {r["email"]: r for r in page["items"]}
    assert all(r["status"] == "sent" and r["smtp_code"] == 250 for r in page["items"])
    assert all("queued as Q" in r["smtp_reply"] for r in page["items"])

    received = {rcpts[0]: msg for rcpts, msg in smtp.handler.wait_for(3)}
    ase = received["ase@example.com"]
    assert ase["Subject"] == "Héllo Åse Ødegård ✓"
    assert ase["To"].addresses[0].display_name == "Åse Ødegård"
    assert ase["From"].addresses[0].addr_spec == "news@example.com"
    assert ase["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert ase["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert ase["Message-ID"] == by_address["ase@example.com"]["message_id"]
    html = ase.get_body(("html",)).get_content()
    assert "<i>Åse Ødegård</i>: &lt;b&gt;&amp;" in html, "variables are escaped in HTML"
    text = ase.get_body(("plain",)).get_content()
    assert "your code is <b>&." in text, "plain text is sent as rendered"
    assert received["bob@example.com"]["Subject"] == "Héllo ✓", "no name: one line, one space"


def test_deferred_bounced_and_dropped(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    recipients = [
        {"email": "ok@example.com"},
        {"email": "bounce@example.com"},
        {"email": "defer@example.com"},
        {"email": "drop@example.com"},
    ]
    sent = client.post("/emails", json=message(text="Hi", recipients=recipients)).json()
    final, _ = follow(client, sent["id"], kind="emails")
    counts = final["counts"]
    assert (counts["sent"], counts["bounced"], counts["failed"]) == (2, 1, 1), counts

    rows = {r["email"]: r for r in client.get(f"/emails/{sent['id']}/recipients").json()["items"]}
    assert rows["bounce@example.com"]["status"] == "bounced"
    assert rows["bounce@example.com"]["smtp_code"] == 550
    assert rows["bounce@example.com"]["attempts"] == 1, "a 5xx reply is never retried"
    assert rows["defer@example.com"]["status"] == "failed"
    assert rows["defer@example.com"]["smtp_code"] == 451
    assert rows["defer@example.com"]["attempts"] == 3, "a 4xx reply is retried (2 retries)"
    assert rows["drop@example.com"]["status"] == "sent"
    assert rows["drop@example.com"]["attempts"] == 2, "a dropped connection, then a fresh one"
    assert smtp.handler.data_tries["drop@example.com"] == 2

    bounced = client.get(f"/emails/{sent['id']}/recipients", params={"status": "bounced"})
    assert [r["email"] for r in bounced.json()["items"]] == ["bounce@example.com"]

    csv_text = client.get(f"/emails/{sent['id']}/recipients.csv").text
    assert csv_text.splitlines()[0].startswith("email,name,status,smtp_code")
    assert "bounce@example.com,,bounced,550" in csv_text

    # every attempt's SMTP outcome is counted: 3 deferrals of one, the dropped connection of
    # another (then sent), a bounce and two sends
    replies = {"sent": 2.0, "deferred": 4.0, "bounced": 1.0}
    wait_until(
        lambda: (
            {k: counted(client, "conveyor_email_replies_total", outcome=k) for k in replies}
            == replies
        ),
        10,
        "the email counters",
    )


def test_a_deferred_recipient_waits_with_its_next_attempt_visible(
    make_client: Callable[..., httpx.Client],
) -> None:
    client = make_client(retry_base_s=3600)
    recipients = [{"email": "ok@example.com"}, {"email": "defer@example.com"}]
    sent = client.post("/emails", json=message(text="Hi", recipients=recipients)).json()
    events = read_events(
        client,
        f"/emails/{sent['id']}/events",
        until=lambda data: data["counts"]["deferred"] == 1 and data["counts"]["sent"] == 1,
    )
    assert all(kind == "counts" and data["status"] == "active" for kind, data in events)
    deferred = client.get(f"/emails/{sent['id']}/recipients", params={"status": "deferred"})
    (row,) = deferred.json()["items"]
    assert row["email"] == "defer@example.com" and row["smtp_code"] == 451
    assert row["next_attempt_at"] is not None and row["next_attempt_at"].endswith("Z")

    cancelled = client.post(f"/emails/{sent['id']}/cancel").json()
    assert cancelled["counts"]["cancelled"] == 1 and cancelled["status"] == "finished"


def test_recipients_filtered_by_status_come_in_full_pages(
    make_client: Callable[..., httpx.Client],
) -> None:
    """Bounced and failed recipients are both failed tasks: a page filtered by one status holds
    only that status and is full (the store filters by error type), with its cursor."""
    client = make_client()
    addresses = ["bounce1", "defer1", "ok1", "bounce2", "defer2", "bounce3", "ok2"]
    recipients = [{"email": f"{name}@example.com"} for name in addresses]
    sent = client.post("/emails", json=message(text="Hi", recipients=recipients)).json()
    follow(client, sent["id"], kind="emails")
    path = f"/emails/{sent['id']}/recipients"

    def pages(status: str) -> list[list[str]]:
        found: list[list[str]] = []
        cursor: str | None = None
        while True:
            params = {"status": status, "limit": 2} | ({"cursor": cursor} if cursor else {})
            page = client.get(path, params=params).json()
            found.append([r["email"].partition("@")[0] for r in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                return found

    assert pages("bounced") == [["bounce1", "bounce2"], ["bounce3"]]
    assert pages("failed") == [["defer1", "defer2"]]
    assert pages("sent") == [["ok1", "ok2"]]
    assert pages("deferred") == [[]]


def test_duplicates_are_sent_once(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    recipients = [
        {"email": "ann@example.com"},
        {"email": "ann@EXAMPLE.com"},
        {"email": "Ann@example.com"},
        {"email": "bob@example.com"},
    ]
    sent = client.post("/emails", json=message(text="Hi", recipients=recipients)).json()
    assert sent["total"] == 2, "addresses are compared without case"
    follow(client, sent["id"], kind="emails")
    received = smtp.handler.wait_for(2)
    assert sorted(rcpts[0] for rcpts, _ in received) == ["ann@example.com", "bob@example.com"]


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        (
            {"recipients": [{"email": "ok@example.com", "vars": {"code": 1}}, {"email": "x y"}]},
            ["body", "recipients", 1, "email"],
        ),
        (  # refused after the first chunks of the batch were written: none of it is committed
            {
                "recipients": [
                    *({"email": f"r{i}@example.com", "vars": {"code": i}} for i in range(9000)),
                    {"email": "r9000@example.com", "name": "A\r\nBcc: v@example.com"},
                ]
            },
            ["body", "recipients", 9000, "name"],
        ),
        ({"subject": "Hi\r\nBcc: victim@example.com"}, ["body", "subject"]),
        (
            {"recipients": [{"email": "ok@example.com", "name": "A\nB"}]},
            ["body", "recipients", 0, "name"],
        ),
        ({"recipients": [{"email": "ok@example.com\r\nX: y"}]}, ["body", "recipients", 0, "email"]),
        ({"headers": {"Bcc": "victim@example.com"}}, ["body", "headers", "Bcc"]),
        ({"headers": {"X-Campaign": "a\r\nBcc: v@example.com"}}, ["body", "headers", "X-Campaign"]),
        ({"text": "Hi {{ name"}, ["body", "template"]),
        ({"text": "Hi {{ missing }}"}, ["body", "text"]),
        ({"text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, ["body", "text"]),
        ({"text": None}, ["body", "text"]),
        ({"from": "nobody"}, ["body", "from"]),
        ({"recipients": []}, ["body", "recipients"]),
    ],
)
def test_bad_emails_name_what_is_wrong(
    make_client: Callable[..., httpx.Client],
    smtp: SmtpServer,
    change: dict[str, Any],
    loc: list[Any],
) -> None:
    client = make_client()
    response = client.post("/emails", json=message(**change))
    assert response.status_code == 422, response.text
    assert loc in [d["loc"] for d in response.json()["detail"]], response.json()
    assert client.get("/batches").json()["items"] == [], "nothing was committed"


def test_sizes_and_sender_are_checked(make_client: Callable[..., httpx.Client]) -> None:
    client = make_client(email_max_recipients=3, smtp_from=None)
    many = [{"email": f"r{i}@example.com"} for i in range(4)]
    too_many = client.post("/emails", json=message(recipients=many, **{"from": "a@example.com"}))
    assert too_many.status_code == 413
    no_sender = client.post("/emails", json=message())
    assert no_sender.status_code == 422 and "CONVEYOR_SMTP_FROM" in no_sender.text
    truncated = client.post(
        "/emails", content=b'{"subject": "x", "recip', headers={"content-type": "application/json"}
    )
    assert truncated.status_code == 422
    assert client.get("/health").status_code == 200


def test_tenants_see_only_their_emails(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, smtp: SmtpServer
) -> None:
    settings = service_settings(
        tmp_path, api_keys="alpha:ka,beta:kb", smtp_url=smtp.url, smtp_from="n@example.com"
    )
    server = serve(create_app(settings))
    alpha = server.client(headers={"authorization": "Bearer ka"})
    beta = server.client(headers={"authorization": "Bearer kb"})
    with alpha, beta:
        sent = alpha.post("/emails", json=message()).json()
        for method, path in [
            ("GET", ""),
            ("GET", "/recipients"),
            ("GET", "/recipients.csv"),
            ("GET", "/events"),
            ("POST", "/cancel"),
            ("POST", "/retry"),
        ]:
            assert beta.request(method, f"/emails/{sent['id']}{path}").status_code == 404, path
        assert alpha.get(f"/emails/{sent['id']}").status_code == 200


def test_an_ordinary_batch_is_not_an_email(make_client: Callable[..., httpx.Client]) -> None:
    client = make_client()
    batch = client.post("/batches", json={"name": "demo.echo", "items": [{"value": 1}]}).json()
    assert client.get(f"/emails/{batch['id']}").status_code == 404


@pytest.mark.anyio
async def test_the_library_sends_one_message(smtp: SmtpServer) -> None:
    target = parse_smtp_url(smtp.url)
    built = build_message(
        sender="a@example.com",
        to="b@example.com",
        subject="One",
        text="Body",
        html=None,
        message_id="<one@example.com>",
    )
    accepted = await send_email(target, built, sender="a@example.com", recipient="b@example.com")
    assert accepted.code == 250 and "queued as" in accepted.reply
    ((rcpts, received),) = smtp.handler.wait_for(1)
    assert rcpts == ["b@example.com"] and received["Message-ID"] == "<one@example.com>"
    with pytest.raises(Bounced) as bounced:
        await send_email(target, built, sender="a@example.com", recipient="bounce@example.com")
    assert bounced.value.code == 550
    with pytest.raises(Deferred):
        await send_email(target, built, sender="a@example.com", recipient="defer@example.com")


def test_a_bad_smtp_rate_is_a_settings_error() -> None:
    with pytest.raises(ValidationError, match="smtp_rate"):
        Settings(smtp_rate="fast")
    assert Settings(smtp_rate="20/s").smtp_rate == "20/s"
    assert "s3cr" not in repr(Settings(smtp_url="smtp://u:s3cr@mail.example.com"))


def test_smtp_urls_keep_their_password_secret() -> None:
    target = parse_smtp_url("smtps://mailer:s3cr%40t@mail.example.com?starttls=off")
    assert (target.host, target.port, target.use_tls) == ("mail.example.com", 465, True)
    assert target.password == "s3cr@t"
    assert "s3cr" not in repr(target) and "s3cr" not in str(target)
    with pytest.raises(EmailInputError):
        parse_smtp_url("http://mail.example.com")


@pytest.mark.parametrize(
    "address",
    [
        "ann@example.com",
        "Ann@EXAMPLE.com",
        "a.b+c@sub.example.co.uk",
        "a..b@example.com",
        ".a@example.com",
        "a@localhost",
        "a@-bad.com",
        "a@ex_ample.com",
        "x" * 65 + "@example.com",
        "a@" + "b" * 64 + ".com",
        "üser@example.com",
        "a@bücher.de",
        '"q q"@example.com',
        "a@example.com.",
        "a@[127.0.0.1]",
        "a@test.local",
    ],
)
def test_addresses_are_judged_as_email_validator_judges_them(address: str) -> None:
    try:
        expected: str | None = str(validate_email(address, check_deliverability=False).normalized)
    except EmailNotValidError:
        expected = None
    try:
        found: str | None = valid_address(address, "to")
    except EmailInputError:
        found = None
    assert found == expected
