"""The ``/batches`` API over a real uvicorn: one request submits many tasks, counts stream over
SSE, items page by status, cancel and retry act on the batch; bad batches are a clear 4xx
naming the item, and tenants are kept apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.live import LiveServer, follow, service_settings


@pytest.fixture
def client(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> Iterator[httpx.Client]:
    settings = service_settings(tmp_path, max_batch_items=500, max_batch_bytes=64_000)
    with serve(create_app(settings)).client() as c:
        yield c


def test_submit_follow_and_page_a_batch(client: httpx.Client) -> None:
    items = [{"value": i} for i in range(120)]
    created = client.post("/batches", json={"name": "demo.echo", "items": items})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert created.headers["location"] == f"/batches/{batch['id']}"
    assert batch["total"] == 120 and set(batch["counts"]) == {
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
    }

    final, events = follow(client, batch["id"], kind="batches")
    assert final["status"] == "finished" and final["counts"]["completed"] == 120
    assert final["progress"] == 100 and final["finished_at"].endswith("Z")
    assert events and all(kind == "counts" for kind, _ in events)
    assert events[-1][1]["counts"]["completed"] == 120
    assert len(events) < len(items), "counts are coalesced, not one event per item"

    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 50} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"/batches/{batch['id']}/items", params=params).json()
        seen += [item["result"] for item in page["items"]]
        assert all(item["batch_id"] == batch["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(120))
    listed = client.get("/batches").json()["items"]
    assert [b["id"] for b in listed] == [batch["id"]]


def test_failed_items_are_filtered_and_retried(client: httpx.Client) -> None:
    items = [{"message": f"broken {i}"} for i in range(6)]
    batch = client.post("/batches", json={"name": "demo.fail", "items": items}).json()
    final, _ = follow(client, batch["id"], kind="batches")
    assert final["counts"]["failed"] == 6

    failed = client.get(f"/batches/{batch['id']}/items", params={"status": "failed"}).json()
    assert [i["error"]["message"] for i in failed["items"]] == [f"broken {i}" for i in range(6)]
    assert (
        client.get(f"/batches/{batch['id']}/items", params={"status": "completed"}).json()["items"]
        == []
    )

    retried = client.post(f"/batches/{batch['id']}/retry", params={"status": "failed"})
    assert retried.status_code == 202, retried.text
    assert retried.json()["counts"]["failed"] == 0
    again, _ = follow(client, batch["id"], kind="batches")
    assert again["counts"]["failed"] == 6
    attempts = client.get(f"/batches/{batch['id']}/items").json()["items"]
    assert {item["attempts"] for item in attempts} == {2}

    wrong = client.post(f"/batches/{batch['id']}/retry", params={"status": "completed"})
    assert wrong.status_code == 422


def test_cancel_a_delayed_batch(client: httpx.Client) -> None:
    items = [{"value": i} for i in range(30)]
    batch = client.post(
        "/batches", json={"name": "demo.echo", "items": items, "delay_s": 3600}
    ).json()
    cancelled = client.post(f"/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["counts"]["cancelled"] == 30
    assert cancelled.json()["status"] == "finished"
    task = client.get(f"/batches/{batch['id']}/items", params={"limit": 1}).json()["items"][0]
    assert client.get(f"/tasks/{task['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"name": "demo.echo"}, ["body", "items"]),
        ({"name": "demo.echo", "items": {"value": 1}}, ["body", "items"]),
        ({"name": "nope", "items": [{"value": 1}]}, ["name"]),
        ({"name": "demo.echo", "items": [{"value": 1}, {}]}, ["items", 1, "args", "value"]),
        ({"name": "demo.echo", "items": [{"value": 1}, 7]}, ["body", "items", 1]),
        ({"name": "demo.echo", "items": [{"value": 1}], "delay_s": -1}, ["body", "delay_s"]),
        ({"name": "demo.echo", "items": [{"value": 1}], "extra": 1}, ["body", "extra"]),
        ({"name": "demo.echo", "items": [{"value": 1}] * 501}, ["body", "items"]),
    ],
)
def test_bad_batches_name_what_is_wrong(
    client: httpx.Client, body: dict[str, object], loc: list[object]
) -> None:
    response = client.post("/batches", json=body)
    assert response.status_code == 422, response.text
    assert loc in [d["loc"] for d in response.json()["detail"]]
    assert client.get("/batches").json()["items"] == [], "nothing was committed"


def test_truncated_empty_and_huge_bodies(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    truncated = client.post(
        "/batches", content=b'{"name": "demo.echo", "items": [{"va', headers=headers
    )
    assert truncated.status_code == 422
    assert client.post("/batches", content=b"", headers=headers).status_code == 422
    huge = client.post("/batches", json={"name": "demo.echo", "items": [{"value": "x" * 70_000}]})
    assert huge.status_code == 413
    assert client.get("/health").status_code == 200


def test_unknown_batches_and_bad_ids(client: httpx.Client) -> None:
    missing = "0192f0c1-0000-7000-8000-000000000000"
    assert client.get(f"/batches/{missing}").status_code == 404
    assert client.get(f"/batches/{missing}/items").status_code == 404
    assert client.get(f"/batches/{missing}/events").status_code == 404
    assert client.post(f"/batches/{missing}/cancel").status_code == 404
    assert client.get("/batches/not-a-uuid").status_code == 422
    batch = client.post("/batches", json={"name": "demo.echo", "items": [{"value": 1}]}).json()
    bad = client.get(f"/batches/{batch['id']}/items", params={"status": "lost"})
    assert bad.status_code == 422


def test_tenants_see_only_their_batches(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="alpha:ka,beta:kb")))
    alpha = server.client(headers={"authorization": "Bearer ka"})
    beta = server.client(headers={"authorization": "Bearer kb"})
    with alpha, beta, server.client() as anonymous:
        assert anonymous.get("/batches").status_code == 401
        batch = alpha.post("/batches", json={"name": "demo.echo", "items": [{"value": 1}]}).json()
        for method, path in [
            ("GET", f"/batches/{batch['id']}"),
            ("GET", f"/batches/{batch['id']}/items"),
            ("GET", f"/batches/{batch['id']}/events"),
            ("POST", f"/batches/{batch['id']}/cancel"),
            ("POST", f"/batches/{batch['id']}/retry"),
        ]:
            assert beta.request(method, path).status_code == 404, path
        assert beta.get("/batches").json()["items"] == []
        assert alpha.get(f"/batches/{batch['id']}").status_code == 200
