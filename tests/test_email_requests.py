"""What a client asks of ``/emails`` beyond a plain send, on both engines: recipients from a CSV
upload, an ``Idempotency-Key`` that sends once, ``send_at`` holding the email, and retries by
recipient status (``deferred`` now, ``failed`` without the ``bounced``, ``bounced`` on demand)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from .support.live import follow, read_events
from .support.smtp_server import SmtpServer, message

pytestmark = pytest.mark.timeout(120)

CSV = (
    "\ufeffEmail,Name,code,city\r\n"
    "ann@example.com,Ann,A1,Oslo\r\n"
    "\r\n"
    '"bob@example.com","Bob, Jr.",B2,"Bergen"\r\n'
    "ANN@example.com,Ann again,A9,Oslo\r\n"
)
TEMPLATE = {"subject": "Hi {{ name }}", "text": "{{ code }} in {{ city }} for {{ email }}"}


def upload(client: httpx.Client, message_part: Any, csv_text: str | bytes, **kw: Any) -> Any:
    raw = message_part if isinstance(message_part, str) else orjson.dumps(message_part).decode()
    return client.post(
        "/emails",
        data={"message": raw},
        files={"recipients": ("list.csv", csv_text, "text/csv")},
        **kw,
    )


def test_recipients_from_a_csv_upload(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    created = upload(client, TEMPLATE, CSV)
    assert created.status_code == 202, created.text
    email = created.json()
    assert email["total"] == 2, "a blank line is skipped, a repeated address sent once"
    final, _ = follow(client, email["id"], kind="emails")
    assert final["counts"]["sent"] == 2
    received = {rcpts[0]: msg for rcpts, msg in smtp.handler.wait_for(2)}
    assert received["bob@example.com"]["Subject"] == "Hi Bob, Jr."
    body = received["bob@example.com"].get_body(("plain",)).get_content()
    assert body.strip() == "B2 in Bergen for bob@example.com", "other columns are template vars"
    rows = client.get(f"/emails/{email['id']}/recipients").json()["items"]
    assert [(r["email"], r["name"]) for r in rows] == [
        ("ann@example.com", "Ann"),
        ("bob@example.com", "Bob, Jr."),
    ]


@pytest.mark.parametrize(
    ("message_part", "csv_text", "status", "loc"),
    [
        (TEMPLATE, "name,code\r\nAnn,A1\r\n", 422, ["body", "recipients"]),
        (TEMPLATE, "email,code\r\nann@example.com,A1\r\nbob@example.com\r\n", 422, None),
        (
            TEMPLATE,
            "email,code,city\r\nann@example.com,A1,Oslo\r\nnot-an-address,B,X\r\n",
            422,
            None,
        ),
        (TEMPLATE, b"email\r\n\xff\xfe@example.com\r\n", 422, ["body", "recipients"]),
        (TEMPLATE, "email,Email\r\na@example.com,b@example.com\r\n", 422, ["body", "recipients"]),
        (TEMPLATE, "", 422, ["body", "recipients"]),
        (TEMPLATE, "email\r\n", 422, ["body", "recipients"]),
        (TEMPLATE, "email\r\n" + "".join(f"r{i}@example.com\r\n" for i in range(4)), 413, None),
        ({**TEMPLATE, "text": "{{ nope }}"}, "email\r\na@example.com\r\n", 422, ["body", "text"]),
        ({**TEMPLATE, "recipients": []}, "email\r\na@example.com\r\n", 422, ["body", "message"]),
        ('{"subject": "x", "te', "email\r\na@example.com\r\n", 422, ["body", "message"]),
        ("[1, 2]", "email\r\na@example.com\r\n", 422, ["body", "message"]),
    ],
)
def test_bad_csv_uploads_name_what_is_wrong(
    make_client: Callable[..., httpx.Client],
    message_part: Any,
    csv_text: str | bytes,
    status: int,
    loc: list[Any] | None,
) -> None:
    client = make_client(email_max_recipients=3)
    response = upload(client, message_part, csv_text)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if loc is not None:
        assert loc in [d["loc"] for d in detail], detail
    elif status == 422:
        assert ["body", "recipients", 1] in [d["loc"][:3] for d in detail], detail
    assert client.get("/batches").json()["items"] == [], "nothing was committed"


def test_a_multipart_body_needs_both_parts(make_client: Callable[..., httpx.Client]) -> None:
    client = make_client()
    no_csv = client.post("/emails", data={"message": orjson.dumps(TEMPLATE).decode()}, files={})
    assert no_csv.status_code in (415, 422), no_csv.text
    only_csv = client.post("/emails", files={"recipients": ("r.csv", "email\r\na@example.com")})
    assert only_csv.status_code == 422
    assert only_csv.json()["detail"][0]["loc"] == ["body", "message"]
    extra = client.post(
        "/emails",
        data={"message": orjson.dumps(TEMPLATE).decode(), "priority": "9"},
        files={"recipients": ("r.csv", "email\r\na@example.com")},
    )
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "priority"]
    plain = client.post(
        "/emails", content=b"email\na@example.com", headers={"content-type": "text/csv"}
    )
    assert plain.status_code == 415 and "multipart/form-data" in plain.json()["detail"]
    assert client.get("/health").status_code == 200


def test_an_idempotency_key_sends_once(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    body = message(recipients=[{"email": "ann@example.com", "name": "Ann", "vars": {"code": 1}}])
    first = client.post("/emails", json=body, headers={"Idempotency-Key": "signup-42"})
    again = client.post("/emails", json=body, headers={"Idempotency-Key": "signup-42"})
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["location"] == f"/emails/{first.json()['id']}"
    other = client.post("/emails", json=body, headers={"Idempotency-Key": "signup-43"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    for sent in (first.json(), other.json()):
        follow(client, sent["id"], kind="emails")
    assert len(smtp.handler.wait_for(2)) == 2, "one message per key"
    assert len(client.get("/batches").json()["items"]) == 2

    bad = client.post("/emails", json=body, headers={"Idempotency-Key": "has space"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
        "header",
        "Idempotency-Key",
    ]

    items = {"name": "demo.echo", "items": [{"value": 1}, {"value": 2}]}
    batch = client.post("/batches", json=items, headers={"Idempotency-Key": "nightly"})
    repeat = client.post("/batches", json=items, headers={"Idempotency-Key": "nightly"})
    assert (batch.status_code, repeat.status_code) == (202, 200)
    assert batch.json()["id"] == repeat.json()["id"] and repeat.json()["total"] == 2


def test_send_at_holds_the_email_until_then(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    response = client.post(
        "/emails",
        json=message(text="Hi", send_at=later.isoformat(), recipients=[{"email": "a@example.com"}]),
    )
    assert response.status_code == 202, response.text
    held = response.json()
    assert held["send_at"] == later.isoformat().replace("+00:00", "Z")
    now = client.post(
        "/emails", json=message(text="Hi", recipients=[{"email": "b@example.com"}])
    ).json()
    follow(client, now["id"], kind="emails")  # the worker was free, and sent only this one
    ((rcpts, _),) = smtp.handler.wait_for(1)
    assert rcpts == ["b@example.com"]
    (row,) = client.get(f"/emails/{held['id']}/recipients").json()["items"]
    assert row["status"] == "queued"
    task = client.get(f"/tasks/{row['task_id']}").json()
    due = datetime.fromisoformat(task["run_at"])
    assert abs((due - later).total_seconds()) < 1, "the recipient's task is due at send_at"
    past = client.post("/emails", json=message(send_at="2001-01-01T00:00:00Z")).json()
    assert follow(client, past["id"], kind="emails")[0]["counts"]["sent"] == 1
    naive = client.post("/emails", json=message(send_at="2031-01-01T00:00:00"))
    assert naive.status_code == 422 and naive.json()["detail"][0]["loc"] == ["body", "send_at"]


def recipient_task_events(
    client: httpx.Client, row: dict[str, Any], until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    return read_events(client, f"/tasks/{row['task_id']}/events", until=until)[-1][1]


def test_retry_by_recipient_status(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client(retry_base_s=3600, email_retries=3)
    recipients = [{"email": "ok@example.com"}, {"email": "defer@example.com"}]
    recipients.append({"email": "bounce@example.com"})
    email = client.post("/emails", json=message(text="Hi", recipients=recipients)).json()
    path = f"/emails/{email['id']}"
    read_events(
        client,
        f"{path}/events",
        until=lambda data: data["counts"]["deferred"] == 1 and data["counts"]["bounced"] == 1,
    )
    rows = {r["email"]: r for r in client.get(f"{path}/recipients").json()["items"]}
    deferred = rows["defer@example.com"]
    assert deferred["status"] == "deferred" and deferred["attempts"] == 1
    waiting_until = deferred["next_attempt_at"]

    tried = client.post(f"{path}/retry", params={"status": "deferred"})
    assert tried.status_code == 202, tried.text
    again = recipient_task_events(
        client, deferred, until=lambda t: t.get("attempts") == 2 and t.get("status") == "queued"
    )
    assert again["error"]["type"] == "Deferred", "the server answered 451 again"
    row = client.get(f"{path}/recipients", params={"status": "deferred"}).json()["items"][0]
    assert row["attempts"] == 2, "tried now, not at the end of its hour of backoff"

    client.post(f"{path}/retry", params={"status": "failed"})
    bounced = client.get(f"{path}/recipients", params={"status": "bounced"}).json()["items"][0]
    assert bounced["attempts"] == 1, "retrying the failed leaves the bounced alone"
    retried = client.post(f"{path}/retry", params={"status": "bounced"})
    assert retried.status_code == 202
    final = recipient_task_events(
        client, bounced, until=lambda t: t.get("status") == "failed" and t.get("attempts") == 2
    )
    assert final["error"]["type"] == "Bounced"
    assert smtp.handler.rcpt_refusals["bounce@example.com"] == 2

    wrong = client.post(f"{path}/retry", params={"status": "sent"})
    assert wrong.status_code == 422
    assert time.time() < datetime.fromisoformat(waiting_until).timestamp(), "within the hour"


def test_variables_orjson_cannot_write_still_arrive(
    make_client: Callable[..., httpx.Client], smtp: SmtpServer
) -> None:
    client = make_client()
    huge = 2**70  # past 64 bits: the strict JSON writer takes over
    body = message(text="{{ n }}", recipients=[{"email": "a@example.com", "vars": {"n": huge}}])
    email = client.post("/emails", json=body).json()
    assert follow(client, email["id"], kind="emails")[0]["counts"]["sent"] == 1
    ((_, received),) = smtp.handler.wait_for(1)
    assert received.get_body(("plain",)).get_content().strip() == str(huge)
