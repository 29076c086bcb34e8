"""The ingestion service end to end: a real JSON API on loopback, the ready service on uvicorn,
runs as tasks, the local table read back; the SSRF guard's rules as a table, and its refusals
shown to happen before any connection (never beyond loopback)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from conveyor.jobs.fetch import retry_after_s
from conveyor.jobs.netguard import refusal
from conveyor.service import create_app

from .support.api_server import Upstream, build_api
from .support.faults import wait_until
from .support.live import LiveServer, counted, follow, service_settings

SECRET = "Bearer s3cr3t-token-value"


@pytest.fixture
def upstream() -> Upstream:
    data = Upstream()
    data.fill(95)
    return data


@pytest.fixture
def api(serve: Callable[[FastAPI], LiveServer], upstream: Upstream) -> Iterator[LiveServer]:
    yield serve(build_api(upstream))
    upstream.release.set()  # answers held back by the test end before the server stops


@pytest.fixture
def target(request: pytest.FixtureRequest) -> str | None:
    """The ingestion database: the SQLite file (None, the default) or, for the tests marked
    ``parametrize("target", BOTH_TARGETS, indirect=True)``, a PostgreSQL database too."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    return str(request.getfixturevalue("postgres").create_database())


BOTH_TARGETS = ["sqlite", "postgres"]


@pytest.fixture
def client(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, api: LiveServer, target: str | None
) -> Iterator[httpx.Client]:
    settings = service_settings(
        tmp_path, ingest_allow_hosts="127.0.0.1", ingest_database_url=target
    )
    with serve(create_app(settings)).client() as c:
        yield c


def source(api: LiveServer, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": path.strip("/").replace("/", "-") or "root",
        "url": f"{api.url}{path}",
        "primary_key": "id",
        **extra,
    }


def run(client: httpx.Client, source_id: str) -> dict[str, Any]:
    started = client.post(f"/ingest/sources/{source_id}/run")
    assert started.status_code == 202, started.text
    return follow(client, started.json()["id"])[0]


def all_rows(client: httpx.Client, source_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 40} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"/ingest/sources/{source_id}/rows", params=params).json()
        rows += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


PAGINATIONS = [
    ("/pages", {"records_path": "data.items", "pagination": {"type": "page_number"}}),
    (
        "/offset",
        {"pagination": {"type": "offset", "limit_param": "limit", "page_size": 10}},
    ),
    (
        "/cursor",
        {
            "records_path": "items",
            "pagination": {"type": "cursor", "param": "cursor", "cursor_path": "meta.next"},
        },
    ),
    ("/link", {"pagination": {"type": "link_header"}}),
    ("/next", {"records_path": "results", "pagination": {"type": "next_url"}}),
]


@pytest.mark.parametrize(("path", "extra"), PAGINATIONS, ids=[p for p, _ in PAGINATIONS])
def test_every_pagination_style_lands_each_record_once(
    client: httpx.Client, api: LiveServer, path: str, extra: dict[str, Any]
) -> None:
    created = client.post("/ingest/sources", json=source(api, path, **extra))
    assert created.status_code == 201, created.text
    task = run(client, created.json()["id"])
    assert task["status"] == "completed", task["error"]
    result = task["result"]
    assert result["rows_inserted"] == 95 and result["rows_rejected"] == 0, result
    assert result["pages"] >= 10
    rows = all_rows(client, created.json()["id"])
    assert sorted(r["id"] for r in rows) == list(range(1, 96))
    assert rows[0]["tags"] == ["a", "b"], "the record is kept whole"


@pytest.mark.parametrize("target", BOTH_TARGETS, indirect=True)
def test_second_run_rewrites_nothing_and_changes_are_updates(
    client: httpx.Client, api: LiveServer, upstream: Upstream, target: str | None
) -> None:
    body = source(api, "/pages", records_path="data.items", pagination={"type": "page_number"})
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    first = run(client, source_id)["result"]
    assert (first["rows_inserted"], first["rows_updated"]) == (95, 0)
    second = run(client, source_id)["result"]
    assert (second["rows_inserted"], second["rows_updated"], second["rows_unchanged"]) == (0, 0, 95)
    assert second["pages_unchanged"] == second["pages"], "the same pages are not read again"
    upstream.records[3]["price"] = 999.0
    upstream.records.append({"id": 500, "name": "new", "colour": "red"})  # a new field
    third = run(client, source_id)["result"]
    assert (third["rows_inserted"], third["rows_updated"], third["rows_unchanged"]) == (1, 1, 94)
    assert 0 < third["pages_unchanged"] < third["pages"] - 1, "the pages that changed are read"
    rows = {r["id"]: r for r in all_rows(client, source_id)}
    assert rows[4]["price"] == 999.0 and rows[500]["colour"] == "red" and len(rows) == 96
    expected = {"inserted": 96.0, "updated": 1.0, "unchanged": 189.0, "rejected": 0.0}
    wait_until(
        lambda: (
            {k: counted(client, "conveyor_ingest_rows_total", outcome=k) for k in expected}
            == expected
        ),
        10,
        "the ingestion counters",
    )
    if target is not None:  # the rows are PostgreSQL's, in a table with a column per field
        table = client.get(f"/ingest/sources/{source_id}").json()["table"]
        stored = asyncio.run(_pg_rows(target, f'SELECT id, price, colour FROM "{table}"'))
        assert len(stored) == 96 and (4, 999.0, None) in stored and (500, None, "red") in stored


def test_pages_are_read_again_when_their_records_are_found_elsewhere(
    client: httpx.Client, api: LiveServer
) -> None:
    """A page whose body is the one last written is passed over unparsed; after a change of
    ``records_path`` the same body holds other records, so every page is read again."""
    body = source(api, "/pages", records_path="data.items", pagination={"type": "page_number"})
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    assert run(client, source_id)["result"]["rows_inserted"] == 95
    again = run(client, source_id)["result"]
    assert (again["rows_unchanged"], again["pages_unchanged"]) == (95, again["pages"])

    path = f"/ingest/sources/{source_id}"
    assert client.patch(path, json={"records_path": "data.gone"}).status_code == 200
    moved = run(client, source_id)["result"]
    assert (moved["pages"], moved["rows_unchanged"], moved["pages_unchanged"]) == (1, 0, 0), moved

    assert client.patch(path, json={"records_path": "data.items"}).status_code == 200
    back = run(client, source_id)["result"]
    assert (back["rows_unchanged"], back["pages_unchanged"], back["rows_inserted"]) == (95, 0, 0)
    assert len(all_rows(client, source_id)) == 95


async def _pg_rows(url: str, query: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


def test_a_page_of_100000_records_lands_in_one_transaction(
    client: httpx.Client, api: LiveServer, upstream: Upstream
) -> None:
    upstream.fill(100_000)
    body = source(api, "/offset", params={"limit": "100000"})
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    task = run(client, source_id)
    assert task["status"] == "completed", task["error"]
    result = task["result"]
    assert (result["pages"], result["rows_inserted"], result["rows_rejected"]) == (1, 100_000, 0)
    assert result["bytes"] > 10_000_000, result["bytes"]
    last = client.get(f"/ingest/sources/{source_id}/rows", params={"cursor": 99_990}).json()
    assert [r["id"] for r in last["items"]] == list(range(99_991, 100_001))
    again = run(client, source_id)["result"]
    assert again["rows_unchanged"] == 100_000, "the second run rewrites nothing"


def test_declared_columns_are_the_table(
    client: httpx.Client, api: LiveServer, upstream: Upstream, tmp_path: Path
) -> None:
    """With ``columns``, the table has those columns with those kinds and no other (a field
    not declared stays in the raw record, which is read back whole); a value that does not fit
    its declared kind is stored as NULL in its column and kept in the raw record."""
    upstream.records[0]["price"] = "unknown"
    columns = {"id": "int", "price": "float", "name": "text", "tags": "json"}
    body = source(api, "/link", pagination={"type": "link_header"}, columns=columns)
    created = client.post("/ingest/sources", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["columns"] == columns
    result = run(client, created.json()["id"])["result"]
    assert (result["rows_inserted"], result["rows_rejected"]) == (95, 0), result
    table = created.json()["table"]
    with sqlite3.connect(tmp_path / "ingest.db") as db:
        kinds = {row[1]: row[2] for row in db.execute(f'PRAGMA table_info("{table}")')}
        stored = db.execute(f'SELECT id, price, name, tags FROM "{table}" ORDER BY id').fetchall()
    assert set(kinds) - {"_row_id", "_raw", "_hash", "_ingested_at"} == set(columns)
    assert (kinds["id"], kinds["price"], kinds["name"]) == ("BIGINT", "FLOAT", "TEXT")
    assert stored[0] == (1, None, "item 1", '["a","b"]'), "a price that is not a number"
    assert stored[1] == (2, 3.0, "item 2", '["a","b"]')
    rows = all_rows(client, created.json()["id"])
    assert rows[0]["price"] == "unknown" and rows[0]["updated_at"], "the record is kept whole"


@pytest.mark.parametrize("target", BOTH_TARGETS, indirect=True)
def test_records_without_key_or_not_objects_are_rejected_with_the_reason(
    client: httpx.Client, api: LiveServer, upstream: Upstream
) -> None:
    upstream.records = [{"id": 1, "a": 1}, {"name": "no key"}, 7, {"id": 1, "a": 2}]
    source_id = client.post("/ingest/sources", json=source(api, "/offset")).json()["id"]
    result = run(client, source_id)["result"]
    assert result["rows_inserted"] == 1 and result["rows_rejected"] == 2
    reasons = [r["reason"] for r in result["rejects"]]
    assert any("'id'" in r for r in reasons) and any("not an object" in r for r in reasons)
    assert all_rows(client, source_id) == [{"id": 1, "a": 2}], "within a page the last wins"


@pytest.mark.parametrize("target", BOTH_TARGETS, indirect=True)
def test_incremental_cursor_is_sent_back_with_lookback(
    client: httpx.Client, api: LiveServer, upstream: Upstream
) -> None:
    body = source(
        api, "/since", cursor={"field": "updated_at", "param": "updated_since", "lookback_s": 5}
    )
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    first = run(client, source_id)["result"]
    assert first["cursor_before"] is None and first["cursor_after"] == "2026-01-01T00:01:35Z"
    upstream.requests.clear()
    second = run(client, source_id)["result"]
    assert "updated_since=2026-01-01T00%3A01%3A30Z" in upstream.requests[0], upstream.requests
    assert (second["rows_inserted"], second["rows_unchanged"]) == (0, 6), "the last 6 seconds"


def test_rate_limits_and_outages_are_retried(
    client: httpx.Client, api: LiveServer, upstream: Upstream
) -> None:
    upstream.failures_left = 4  # 503, 429, 503, 429 with Retry-After: 0
    body = source(
        api, "/flaky/pages", records_path="data.items", pagination={"type": "page_number"}
    )
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    result = run(client, source_id)["result"]
    assert result["retries"] == 4 and result["rows_inserted"] == 95


@pytest.mark.parametrize(
    ("path", "extra", "message"),
    [
        ("/html", {}, "HTML page"),
        ("/truncated", {}, "not valid JSON"),
        ("/bomb", {"max_response_bytes": 1_000_000}, "byte limit"),
        ("/loop", {"records_path": "results", "pagination": {"type": "next_url"}}, "already"),
        ("/wait-long", {}, "rate-limited"),
        ("/slow", {"timeout_s": 0.5}, "ReadTimeout"),
        ("/missing", {}, "404"),
    ],
)
def test_bad_answers_fail_the_run_with_a_clear_error(
    client: httpx.Client, api: LiveServer, path: str, extra: dict[str, Any], message: str
) -> None:
    body = source(api, path, **extra) | {"name": f"bad{path.replace('/', '-')}"}
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    task = run(client, source_id)
    assert task["status"] == "failed"
    assert message in task["error"]["message"], task["error"]
    assert client.get("/health").status_code == 200, "the service is up"


def test_a_source_is_changed_in_place(
    client: httpx.Client, api: LiveServer, upstream: Upstream
) -> None:
    """PATCH changes what it names, checked with the rest of the source: new headers are sent
    and never shown, a new time spec moves the source's schedule (or ends it), a new cursor
    field starts from the beginning; its name, table and key stay; a bad change is a 422 that
    leaves the source as it was."""
    body = source(
        api,
        "/since",
        headers={"Authorization": SECRET},
        every_s=3600,
        cursor={"field": "updated_at", "param": "updated_since"},
    )
    created = client.post("/ingest/sources", json=body).json()
    path = f"/ingest/sources/{created['id']}"
    assert run(client, created["id"])["result"]["rows_inserted"] == 95

    changed = client.patch(path, json={"headers": {"X-Api-Key": "k-654321"}, "cron": "0 6 * * *"})
    assert changed.status_code == 200, changed.text
    shown = changed.json()
    assert shown["headers"] == ["X-Api-Key"] and "k-654321" not in changed.text
    assert (shown["cron"], shown["every_s"]) == ("0 6 * * *", None)
    assert shown["schedule_id"] == created["schedule_id"], "the same schedule, moved"
    schedule = client.get(f"/schedules/{created['schedule_id']}").json()
    assert (schedule["cron"], schedule["every_s"]) == ("0 6 * * *", None)
    assert client.get(path).json() == shown

    upstream.requests.clear()
    rerun = run(client, created["id"])["result"]
    assert upstream.seen_headers[-1]["x-api-key"] == "k-654321"
    assert "authorization" not in upstream.seen_headers[-1], "headers are replaced whole"
    assert "updated_since=" in upstream.requests[0], "the cursor is kept"
    assert rerun["rows_unchanged"] == 1

    upstream.requests.clear()
    recursor = client.patch(path, json={"cursor": {"field": "id", "param": "after"}})
    assert recursor.status_code == 200, recursor.text
    assert run(client, created["id"])["result"]["cursor_before"] is None
    assert "after=" not in upstream.requests[0], "a new cursor field starts from the start"

    ended = client.patch(path, json={"cron": None})
    assert ended.status_code == 200 and ended.json()["schedule_id"] is None
    assert client.get(f"/schedules/{created['schedule_id']}").status_code == 404

    for bad, field in [
        ({"url": "ftp://example.com/"}, "url"),
        ({"every_s": 0.5}, "every_s"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"primary_key": "name"}, "primary_key"),
        ({"table": "other"}, "table"),
        ({"name": "renamed"}, "name"),
    ]:
        refused = client.patch(path, json=bad)
        assert refused.status_code == 422, (bad, refused.text)
        assert field in refused.text, (bad, refused.text)
    assert client.get(path).json() == ended.json(), "a refused change changes nothing"
    assert (
        client.patch(
            "/ingest/sources/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12, json={}
        ).status_code
        == 404
    )


def test_headers_are_sent_but_never_shown(
    client: httpx.Client, api: LiveServer, upstream: Upstream
) -> None:
    body = source(api, "/offset", headers={"Authorization": SECRET, "X-Api-Key": "k-123456"})
    created = client.post("/ingest/sources", json=body)
    assert created.status_code == 201
    source_id = created.json()["id"]
    task = run(client, source_id)
    assert task["status"] == "completed"
    assert upstream.seen_headers[-1]["authorization"] == SECRET
    shown = [
        created.text,
        client.get(f"/ingest/sources/{source_id}").text,
        client.get("/ingest/sources").text,
        client.get(f"/tasks/{task['id']}").text,
        client.get("/tasks").text,
    ]
    for text in shown:
        assert "s3cr3t" not in text and "k-123456" not in text
    assert client.get(f"/ingest/sources/{source_id}").json()["headers"] == [
        "Authorization",
        "X-Api-Key",
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:{port}/pages",  # loopback, not in the allowlist
        "http://localhost:{port}/pages",  # a name resolving to loopback
        "http://[::ffff:127.0.0.2]:{port}/pages",  # IPv4-mapped IPv6
        "http://127.0.0.1:{port}/inside",  # allowed, but redirects inside
    ],
)
def test_inside_addresses_are_refused_before_connecting(
    client: httpx.Client, api: LiveServer, upstream: Upstream, url: str
) -> None:
    body = {"name": "inside", "url": url.format(port=api.port), "primary_key": "id"}
    source_id = client.post("/ingest/sources", json=body).json()["id"]
    task = run(client, source_id)
    assert task["status"] == "failed" and "refused" in task["error"]["message"], task["error"]
    assert all("/pages" not in r for r in upstream.requests), "no request reached the address"


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("fe80::1", True),
        ("100.64.0.1", True),  # carrier-grade NAT
        ("224.0.0.1", True),
        ("ff02::1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("::ffff:8.8.8.8", False),
        ("64:ff9b::a9fe:a9fe", True),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", True),  # 6to4 of 127.0.0.1
        ("fc00::1", True),
        ("not an address", True),
    ],
)
def test_address_rules(address: str, refused: bool) -> None:
    assert (refusal(address) is not None) is refused, refusal(address)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"primary_key": []}, "primary_key"),
        ({"headers": {"X-Bad": "a\r\nInjected: 1"}}, "headers"),
        ({"headers": {"Bad Name": "v"}}, "headers"),
        ({"pagination": {"type": "magic"}}, "pagination"),
        ({"table": "drop table x;"}, "table"),
        ({"every_s": 0.1}, "every_s"),
        ({"cron": "0 0 31 2 *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"columns": {"price": "money"}}, "columns"),
        ({"columns": {"bad name": "int"}}, "columns"),
        ({"columns": {"_raw": "text"}}, "columns"),
        ({"columns": {"Price": "float", "price": "float"}}, "columns"),
    ],
)
def test_bad_sources_get_422(client: httpx.Client, body: dict[str, Any], field: str) -> None:
    base = {"name": "bad", "url": "https://example.com/api", "primary_key": "id"}
    refused = client.post("/ingest/sources", json=base | body)
    assert refused.status_code == 422, refused.text
    assert field in refused.text
    assert client.get("/ingest/sources").json()["items"] == [], "nothing was kept"


def test_a_scheduled_source_runs_on_its_own_and_tenants_are_apart(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, api: LiveServer, upstream: Upstream
) -> None:
    settings = service_settings(
        tmp_path, ingest_allow_hosts="127.0.0.1", api_keys="alpha:ka,beta:kb"
    )
    server = serve(create_app(settings))
    alpha = server.client(headers={"authorization": "Bearer ka"})
    beta = server.client(headers={"authorization": "Bearer kb"})
    with alpha, beta:
        body = source(api, "/offset", every_s=1)
        created = alpha.post("/ingest/sources", json=body)
        assert created.status_code == 201, created.text
        mine = created.json()
        schedules = alpha.get("/schedules").json()["items"]
        assert [s["id"] for s in schedules] == [mine["schedule_id"]]
        # the first fire's run asks the API: its fire (and task) are recorded by then
        upstream.wait_until(lambda asked: any(r.startswith("/offset") for r in asked))
        fires = alpha.get(f"/schedules/{mine['schedule_id']}/fires").json()["items"]
        task = follow(alpha, fires[-1]["task_id"])[0]
        assert task["status"] == "completed", task["error"]
        assert task["result"]["rows_inserted"] == 10, "the first fire's run: one page of 10"
        for path in ["", "/rows"]:
            assert beta.get(f"/ingest/sources/{mine['id']}{path}").status_code == 404
        assert beta.post(f"/ingest/sources/{mine['id']}/run").status_code == 404
        assert beta.delete(f"/ingest/sources/{mine['id']}").status_code == 404
        assert beta.get("/ingest/sources").json()["items"] == []
        assert alpha.delete(f"/ingest/sources/{mine['id']}").status_code == 204
        assert alpha.get("/schedules").json()["items"] == [], "its schedule went with it"


@pytest.mark.timeout(300)
def test_kill_9_mid_run_keeps_each_record_once_and_the_cursor_behind_the_data(
    tmp_path: Path, api: LiveServer, upstream: Upstream
) -> None:
    """The server is killed while a run is half way; the table then holds each record once and
    no cursor ahead of it; after the restart the run is recovered and completes."""
    import os
    import sqlite3
    import sys

    from .support.live import free_port
    from .support.process import Process

    upstream.fill(1000)
    upstream.gate_after = 30  # page 31 waits until the server was killed
    env = {
        **os.environ,
        "CONVEYOR_DATA_DIR": str(tmp_path),
        "CONVEYOR_LEASE_S": "2",
        "CONVEYOR_INGEST_ALLOW_HOSTS": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }

    def serve(port: int) -> Process:
        return Process(["serve", "--port", str(port)], env, "Uvicorn running on")

    def stored() -> tuple[list[int], str | None, str | None]:
        with sqlite3.connect(tmp_path / "ingest.db") as db:
            ids = [row[0] for row in db.execute("SELECT id FROM src_gated")]
            state = db.execute(
                "SELECT cursor, pending_cursor FROM conveyor_ingest_state"
            ).fetchone()
        return ids, *(state or (None, None))

    port = free_port()
    server = serve(port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            body = source(
                api,
                "/gated",
                pagination={"type": "page_number"},
                cursor={"field": "updated_at", "param": "since"},
            )
            source_id = client.post("/ingest/sources", json=body).json()["id"]
            task_id = client.post(f"/ingest/sources/{source_id}/run").json()["id"]
            # a run asks for page 31 once page 30 is committed
            upstream.wait_until(lambda asked: any("page=31" in r for r in asked))
    finally:
        server.kill()
    upstream.release.set()
    ids, cursor, pending = stored()
    assert 0 < len(ids) < 1000 and len(ids) == len(set(ids)), "each record once"
    assert sorted(ids) == list(range(1, 301)), "the 30 pages served, committed"
    assert cursor is None, "the run did not end: no cursor for the next run yet"
    highest = max(upstream.records[i - 1]["updated_at"] for i in ids)
    assert pending is not None and pending.strip('"') <= highest, "the cursor is not ahead"

    port = free_port()
    server = serve(port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            task = follow(client, task_id)[0]
    finally:
        server.kill()
    assert task["status"] == "completed" and task["attempts"] == 2, task
    ids, cursor, pending = stored()
    assert sorted(ids) == list(range(1, 1001))
    assert cursor == '"2026-01-01T00:16:40Z"' and pending is None


def test_a_public_name_resolving_inside_is_refused_before_connecting() -> None:
    """A resolver the test controls: a public-looking name pointing at cloud metadata, or at
    one public and one private address, is refused before any socket opens."""
    import anyio

    from conveyor.jobs.netguard import GuardedBackend, Refused

    asked: list[str] = []
    answers = {
        "metadata.example.com": ["169.254.169.254"],
        "mixed.example.com": ["93.184.216.34", "10.0.0.7"],
        "mapped.example.com": ["::ffff:127.0.0.1"],
        "nothing.example.com": [],
    }

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[host]

    class NoNetwork:
        """Stands in for the sockets: a broken guard is seen here, and sends nothing."""

        async def connect_tcp(self, host: str, port: int, **_: Any) -> None:
            raise AssertionError(f"the guard let a connection to {host} through")

    async def connect(host: str) -> str:
        backend = GuardedBackend(resolver=resolver)
        backend._inner = NoNetwork()  # type: ignore[assignment]
        try:
            await backend.connect_tcp(host, 80, timeout=1)
        except Refused as exc:
            return str(exc)
        return "connected"

    for host in answers:
        outcome = anyio.run(connect, host)
        assert outcome != "connected" and host in outcome, outcome
    assert asked == list(answers), "each name resolved once, by the guard"
