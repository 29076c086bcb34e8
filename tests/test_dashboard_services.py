"""The ready services' dashboard pages over a live server: the emails (counts by recipient
status, recipients with their SMTP replies, the CSV, cancel and retry) against a real SMTP
server, the ingestion sources (settings without header values, runs, rows, run now) against a
real HTTP API, and the task list narrowed to a schedule; CSRF and tenants on each."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.api_server import Upstream, build_api
from .support.live import LiveServer, follow, read_events, service_settings
from .support.smtp_server import SmtpServer

pytestmark = pytest.mark.timeout(120)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "the page has a form with a CSRF token"
    return found.group(1)


def count_shown(html: str, status: str) -> int:
    found = re.search(rf'data-count="{status}">(\d+)<', html)
    assert found is not None, status
    return int(found.group(1))


def test_emails_pages_show_each_recipients_reply_and_act(
    make_client: Callable[..., httpx.Client],
) -> None:
    client = make_client()
    body = {
        "subject": "News <b>",
        "text": "Hello",
        "recipients": [
            {"email": "ann@example.com", "name": "Ann <i>"},
            {"email": "bounce1@example.com"},
            {"email": "bob@example.com"},
        ],
    }
    email = client.post("/emails", json=body).json()
    follow(client, email["id"], kind="emails")

    listing = client.get("/dashboard/emails")
    assert listing.status_code == 200
    assert f"/dashboard/emails/{email['id']}" in listing.text
    assert "News &lt;b&gt;" in listing.text and "News <b>" not in listing.text
    nav = client.get("/dashboard/").text
    assert 'href="/dashboard/emails"' in nav and 'href="/dashboard/ingestion"' in nav

    path = f"/dashboard/emails/{email['id']}"
    page = client.get(path).text
    assert count_shown(page, "sent") == 2 and count_shown(page, "bounced") == 1
    assert "550" in page and "No such user here" in page, "the server's reply"
    assert "Ann &lt;i&gt;" in page
    assert f'data-events="/dashboard/emails/{email["id"]}/events"' in page
    live = read_events(client, f"{path}/events", until=lambda data: True)
    assert live == [
        ("counts", {"by_status": client.get(f"/emails/{email['id']}").json()["counts"]})
    ]
    bounced = client.get(path, params={"status": "bounced"}).text
    assert "bounce1@example.com" in bounced and "ann@example.com" not in bounced
    assert client.get(path, params={"status": "lost"}).status_code == 422

    csv_text = client.get(f"{path}/recipients.csv").text
    assert csv_text.splitlines()[0].startswith("email,name,status")
    assert "bounce1@example.com,,bounced,550" in csv_text

    assert client.post(f"{path}/retry", data={"status": "bounced"}).status_code == 403
    again = client.post(f"{path}/retry", data={"status": "bounced", "csrf": csrf_of(page)})
    assert again.status_code == 303
    follow(client, email["id"], kind="emails")
    after = client.get(f"/emails/{email['id']}/recipients", params={"status": "bounced"}).json()
    assert [r["attempts"] for r in after["items"]] == [2], "sent again once, bounced again"
    assert client.get("/dashboard/emails/0190b1e2-0000-7000-8000-000000000000").status_code == 404


def test_cancelling_an_email_from_its_page_and_listing_emails(
    make_client: Callable[..., httpx.Client],
) -> None:
    client = make_client()
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    body = {"subject": "Later", "text": "x", "send_at": later, "recipients": [{"email": "a@b.co"}]}
    email = client.post("/emails", json=body).json()
    path = f"/dashboard/emails/{email['id']}"
    page = client.get(path).text
    assert 'id="cancel"' in page and count_shown(page, "queued") == 1
    cancelled = client.post(f"{path}/cancel", data={"csrf": csrf_of(page)})
    assert cancelled.status_code == 303
    assert client.get(f"/emails/{email['id']}").json()["counts"]["cancelled"] == 1
    assert 'id="retry-cancelled"' in client.get(path).text

    second = client.post("/emails", json=body | {"subject": "Second"}).json()
    first_page = client.get("/emails", params={"limit": 1}).json()
    assert [e["id"] for e in first_page["items"]] == [second["id"]], "newest first"
    rest = client.get("/emails", params={"limit": 1, "cursor": first_page["next_cursor"]}).json()
    assert [e["id"] for e in rest["items"]] == [email["id"]] and rest["next_cursor"] is None
    assert rest["items"][0]["counts"]["cancelled"] == 1
    assert client.get("/emails", params={"cursor": "soon"}).status_code == 422


@pytest.fixture
def api(serve: Callable[[FastAPI], LiveServer]) -> LiveServer:
    upstream = Upstream()
    upstream.fill(30)
    return serve(build_api(upstream))


def test_ingestion_pages_show_sources_runs_and_rows_never_secrets(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, api: LiveServer
) -> None:
    settings = service_settings(tmp_path, ingest_allow_hosts="127.0.0.1")
    with serve(create_app(settings)).client() as client:
        body = {
            "name": "people <b>",
            "url": f"{api.url}/offset",
            "primary_key": "id",
            "pagination": {"type": "offset", "limit_param": "limit", "page_size": 10},
            "headers": {"X-Api-Key": "k-s3cr3t-999"},
            "every_s": 3600,
        }
        source = client.post("/ingest/sources", json=body).json()
        first = client.post(f"/ingest/sources/{source['id']}/run").json()
        follow(client, first["id"])

        listing = client.get("/dashboard/ingestion").text
        assert f"/dashboard/ingestion/{source['id']}" in listing
        assert "people &lt;b&gt;" in listing and "completed" in listing
        path = f"/dashboard/ingestion/{source['id']}"
        page = client.get(path).text
        assert "X-Api-Key" in page and "k-s3cr3t-999" not in page
        runs_table = page[page.index('id="runs"') : page.index('id="rows"')]
        assert first["id"] in runs_table and "<td>30</td>" in runs_table, "30 rows inserted"
        assert f"/dashboard/schedules/{source['schedule_id']}" in page
        assert "item 1<" in page and "item 20<" in page and "item 21<" not in page, "20 rows"

        assert client.post(f"{path}/run", data={}).status_code == 403
        started = client.post(f"{path}/run", data={"csrf": csrf_of(page)})
        assert started.status_code == 303
        second = started.headers["location"].rsplit("/", 1)[1]
        task = follow(client, second)[0]
        assert task["status"] == "completed" and task["result"]["rows_unchanged"] == 30
        runs = client.get(f"/ingest/sources/{source['id']}/runs").json()["items"]
        assert [r["id"] for r in runs] == [second, first["id"]]
        idle = client.post("/ingest/sources", json={**body, "name": "idle"}).json()
        rows = client.get("/dashboard/ingestion").text.split("<tr>")
        (busy_row,) = [row for row in rows if f"/ingestion/{source['id']}" in row]
        (idle_row,) = [row for row in rows if f"/ingestion/{idle['id']}" in row]
        assert f"/tasks/{second}" in busy_row and f"/tasks/{first['id']}" not in busy_row
        assert "/tasks/" not in idle_row, "a source never run has no latest run"
        assert client.get("/dashboard/ingestion/nope").status_code == 404


def test_services_pages_keep_tenants_apart(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, api: LiveServer, smtp: SmtpServer
) -> None:
    settings = service_settings(
        tmp_path,
        api_keys="alpha:alpha-secret-key,beta:beta-secret-key",
        ingest_allow_hosts="127.0.0.1",
        smtp_url=smtp.url,
        smtp_from="news@example.com",
    )
    server = serve(create_app(settings))
    api_a = server.client(headers={"authorization": "Bearer alpha-secret-key"})
    api_b = server.client(headers={"authorization": "Bearer beta-secret-key"})
    browser = server.client(follow_redirects=False)
    with api_a, api_b, browser:
        mine = api_a.post("/tasks", json={"name": "demo.echo", "args": {"value": 1}}).json()
        email = api_b.post(
            "/emails",
            json={"subject": "b-only", "text": "x", "recipients": [{"email": "ann@example.com"}]},
        ).json()
        source = api_b.post(
            "/ingest/sources",
            json={"name": "b-source", "url": f"{api.url}/offset", "primary_key": "id"},
        ).json()
        schedule = api_b.post(
            "/schedules",
            json={"name": "b-hourly", "task": "demo.echo", "args": {"value": 1}, "every_s": 3600},
        ).json()
        fired = api_b.post(f"/schedules/{schedule['id']}/trigger").json()["id"]
        assert browser.get("/dashboard/emails").status_code == 303, "a key first"
        browser.post("/dashboard/login", data={"key": "alpha-secret-key"})
        assert "b-only" not in browser.get("/dashboard/emails").text
        assert "b-source" not in browser.get("/dashboard/ingestion").text
        page = browser.get("/dashboard/tasks", params={"schedule": schedule["id"]}).text
        assert fired not in page and "No task matches" in page
        token = csrf_of(browser.get(f"/dashboard/tasks/{mine['id']}").text)
        for path, form in [
            (f"/dashboard/emails/{email['id']}", None),
            (f"/dashboard/emails/{email['id']}/recipients.csv", None),
            (f"/dashboard/emails/{email['id']}/cancel", {"csrf": token}),
            (f"/dashboard/emails/{email['id']}/retry", {"csrf": token, "status": "failed"}),
            (f"/dashboard/ingestion/{source['id']}", None),
            (f"/dashboard/ingestion/{source['id']}/run", {"csrf": token}),
        ]:
            answer: Any = browser.post(path, data=form) if form else browser.get(path)
            assert answer.status_code == 404, (path, answer.status_code)
        assert api_b.get(f"/emails/{email['id']}").status_code == 200
        assert api_b.get(f"/ingest/sources/{source['id']}/runs").json()["items"] == []
