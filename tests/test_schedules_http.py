"""The ``/schedules`` API over a real uvicorn: create, list, change, pause, resume, trigger, the
next fire times with DST flagged, the history, bad schedules refused naming the field, and
tenants kept apart."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.faults import wait_until
from .support.live import LiveServer, follow, free_port, service_settings


@pytest.fixture
def client(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> Iterator[httpx.Client]:
    with serve(create_app(service_settings(tmp_path))).client() as c:
        yield c


def hourly(**extra: Any) -> dict[str, Any]:
    base = {"name": "hourly-echo", "task": "demo.echo", "args": {"value": 1}, "cron": "0 * * * *"}
    return base | extra


def test_create_list_change_and_delete(client: httpx.Client) -> None:
    created = client.post("/schedules", json=hourly(timezone="Europe/Oslo"))
    assert created.status_code == 201, created.text
    schedule = created.json()
    assert created.headers["location"] == f"/schedules/{schedule['id']}"
    assert {"id", "name", "task", "next_fire_at", "enabled"} <= set(schedule)
    assert schedule["enabled"] is True and schedule["task"] == "demo.echo"
    assert schedule["next_fire_at"].endswith(":00:00Z")

    again = client.post("/schedules", json=hourly())
    assert again.status_code == 409, "a name is taken once per tenant"

    listed = client.get("/schedules").json()["items"]
    assert [s["id"] for s in listed] == [schedule["id"]]
    assert client.get(f"/schedules/{schedule['id']}").json() == schedule

    changed = client.patch(f"/schedules/{schedule['id']}", json={"every_s": 90, "cron": None})
    assert changed.status_code == 200, changed.text
    assert changed.json()["every_s"] == 90 and changed.json()["cron"] is None
    assert changed.json()["next_fire_at"] != schedule["next_fire_at"]

    paused = client.post(f"/schedules/{schedule['id']}/pause").json()
    assert paused["enabled"] is False
    assert client.get(f"/schedules/{schedule['id']}/next").json()["items"] == []
    resumed = client.post(f"/schedules/{schedule['id']}/resume").json()
    assert resumed["enabled"] is True and resumed["next_fire_at"] is not None

    assert client.delete(f"/schedules/{schedule['id']}").status_code == 204
    assert client.get(f"/schedules/{schedule['id']}").status_code == 404
    assert client.get("/schedules").json()["items"] == []


def test_trigger_runs_once_and_is_in_the_history(client: httpx.Client) -> None:
    schedule = client.post("/schedules", json=hourly(args={"value": "now"})).json()
    triggered = client.post(f"/schedules/{schedule['id']}/trigger")
    assert triggered.status_code == 202, triggered.text
    task = follow(client, triggered.json()["id"])[0]
    assert task["status"] == "completed" and task["result"] == "now"
    fires = client.get(f"/schedules/{schedule['id']}/fires").json()
    assert fires["next_cursor"] is None
    assert [(f["outcome"], f["task_id"]) for f in fires["items"]] == [("triggered", task["id"])]
    again = client.post(f"/schedules/{schedule['id']}/trigger").json()
    assert again["id"] != task["id"], "each trigger is its own run"
    page = client.get(f"/schedules/{schedule['id']}/fires", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["next_cursor"] is not None
    rest = client.get(
        f"/schedules/{schedule['id']}/fires", params={"limit": 1, "cursor": page["next_cursor"]}
    ).json()
    assert [f["task_id"] for f in page["items"] + rest["items"]] == [again["id"], task["id"]]


def listed_ids(client: httpx.Client, **params: Any) -> list[str]:
    return [t["id"] for t in client.get("/tasks", params=params).json()["items"]]


def test_a_schedules_tasks_are_listed_and_link_back(client: httpx.Client) -> None:
    """``GET /tasks?schedule=`` lists the tasks a schedule made, newest first, with the other
    filters and the cursor; each of them names its schedule."""
    schedule = client.post("/schedules", json=hourly()).json()
    other = client.post("/schedules", json=hourly(name="other")).json()
    made = [client.post(f"/schedules/{schedule['id']}/trigger").json()["id"] for _ in range(3)]
    elsewhere = client.post(f"/schedules/{other['id']}/trigger").json()["id"]
    plain = client.post("/tasks", json={"name": "demo.echo", "args": {"value": 2}}).json()
    for task_id in [*made, elsewhere, plain["id"]]:
        follow(client, task_id)

    assert listed_ids(client, schedule=schedule["id"]) == made[::-1]
    assert listed_ids(client, schedule=other["id"]) == [elsewhere]
    first = client.get("/tasks", params={"schedule": schedule["id"], "limit": 2}).json()
    rest = listed_ids(client, schedule=schedule["id"], cursor=first["next_cursor"])
    assert [t["id"] for t in first["items"]] + rest == made[::-1]
    assert listed_ids(client, schedule=schedule["id"], status="failed") == []
    assert listed_ids(client, schedule="0190b1e2-0000-7000-8000-000000000000") == []

    task = client.get(f"/tasks/{made[0]}").json()
    assert task["schedule_id"] == schedule["id"]
    assert task["links"]["schedule"] == f"/schedules/{schedule['id']}"
    assert plain["schedule_id"] is None and "schedule" not in plain["links"]


def nightly_in_oslo(client: httpx.Client, name: str, start: str, end: str) -> list[Any]:
    """The next fires of a 02:30 Europe/Oslo schedule between ``start`` and ``end``."""
    body = hourly(name=name, cron="30 2 * * *", timezone="Europe/Oslo", start_at=start, end_at=end)
    schedule = client.post("/schedules", json=body).json()
    found = client.get(f"/schedules/{schedule['id']}/next", params={"count": 5}).json()
    return list(found["items"])


def test_next_fires_flag_the_dst_gap_and_fold(client: httpx.Client) -> None:
    """Europe/Oslo in 2027: 02:30 does not exist on 28 March and happens twice on 31 October."""
    items = nightly_in_oslo(client, "spring", "2027-03-27T00:00:00Z", "2027-03-30T00:00:00Z")
    assert [i["local"][:16] for i in items] == [
        "2027-03-27T02:30",
        "2027-03-28T03:00",  # the first instant after the gap
        "2027-03-29T02:30",
    ]
    assert [i["dst_gap"] for i in items] == [False, True, False]
    items = nightly_in_oslo(client, "autumn", "2027-10-30T00:00:00Z", "2027-11-01T00:00:00Z")
    assert [(i["utc"], i["dst_fold"]) for i in items] == [
        ("2027-10-30T00:30:00Z", False),
        ("2027-10-31T00:30:00Z", True),  # once, at the first of the two 02:30s
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (hourly(cron="every hour"), "cron"),
        (hourly(cron="0 0 31 2 *"), "cron"),
        (hourly(timezone="Mars/Olympus"), "timezone"),
        (hourly(timezone="../../etc/passwd"), "timezone"),
        (hourly(cron=None, every_s=0.5), "every_s"),
        (hourly(cron=None, every_s="60"), "every_s"),
        (hourly(args={"value": 1, "extra": 2}), "args"),
        (hourly(task="no.such.type"), "task"),
        (hourly(misfire="sometimes"), "misfire"),
        (hourly(start_at="yesterday"), "start_at"),
        (hourly(start_at="2027-01-01T00:00:00"), "start_at"),  # no time zone
        (hourly(name=""), "name"),
        (hourly(name="line\nbreak"), "name"),
        (hourly(surprise=True), "surprise"),
    ],
)
def test_bad_schedules_get_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    refused = client.post("/schedules", json=body)
    assert refused.status_code == 422, refused.text
    locations = [tuple(d["loc"]) for d in refused.json()["detail"]]
    assert any(loc[:2] == ("body", field) for loc in locations), locations
    assert client.get("/schedules").json()["items"] == [], "nothing was kept"


def test_bad_changes_get_422_and_leave_the_schedule_alone(client: httpx.Client) -> None:
    schedule = client.post("/schedules", json=hourly()).json()
    for body, field in [
        ({"task": None}, "task"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"args": {"value": 1, "nope": 0}}, "args"),
        ({"timezone": "Nowhere"}, "timezone"),
        ({"cron": None}, "cron"),  # neither cron nor every_s left
    ]:
        refused = client.patch(f"/schedules/{schedule['id']}", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["detail"][0]["loc"][:2] == ["body", field], refused.json()
    assert client.get(f"/schedules/{schedule['id']}").json() == schedule
    assert client.patch(f"/schedules/{schedule['id']}", content=b"{").status_code == 422
    assert client.get("/schedules/not-a-uuid").status_code == 422
    unknown = "00000000-0000-7000-8000-000000000000"
    assert client.get(f"/schedules/{unknown}").status_code == 404
    assert client.post(f"/schedules/{unknown}/trigger").status_code == 404


def test_a_tenant_sees_only_its_schedules(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="alpha:ka,beta:kb")))
    alpha = server.client(headers={"authorization": "Bearer ka"})
    beta = server.client(headers={"authorization": "Bearer kb"})
    with alpha, beta, server.client() as anonymous:
        assert anonymous.get("/schedules").status_code == 401
        mine = alpha.post("/schedules", json=hourly()).json()
        theirs = beta.post("/schedules", json=hourly())
        assert theirs.status_code == 201, "names are per tenant"
        assert [s["id"] for s in beta.get("/schedules").json()["items"]] == [theirs.json()["id"]]
        for method, path in [
            ("GET", ""),
            ("PATCH", ""),
            ("DELETE", ""),
            ("POST", "/pause"),
            ("POST", "/trigger"),
            ("GET", "/fires"),
            ("GET", "/next"),
        ]:
            kwargs: dict[str, Any] = {"json": {"enabled": False}} if method == "PATCH" else {}
            answer = beta.request(method, f"/schedules/{mine['id']}{path}", **kwargs)
            assert answer.status_code == 404, (method, path, answer.text)
        assert alpha.get(f"/schedules/{mine['id']}").json() == mine, "untouched"
        fired = alpha.post(f"/schedules/{mine['id']}/trigger").json()["id"]
        assert listed_ids(alpha, schedule=mine["id"]) == [fired]
        assert listed_ids(beta, schedule=mine["id"]) == [], "nor the tasks it made"


def test_schedules_on_postgresql(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, postgres: Any
) -> None:
    """The PostgreSQL store keeps schedules too: created, listed, triggered and in the
    history, over the same routes."""
    settings = service_settings(tmp_path, database_url=postgres.create_database())
    with serve(create_app(settings)).client() as client:
        created = client.post("/schedules", json=hourly(args={"value": "pg"}))
        assert created.status_code == 201, created.text
        schedule = created.json()
        assert schedule["next_fire_at"].endswith(":00:00Z")
        assert [s["id"] for s in client.get("/schedules").json()["items"]] == [schedule["id"]]
        triggered = client.post(f"/schedules/{schedule['id']}/trigger")
        assert triggered.status_code == 202, triggered.text
        task = follow(client, triggered.json()["id"])[0]
        assert task["status"] == "completed" and task["result"] == "pg"
        fires = client.get(f"/schedules/{schedule['id']}/fires").json()["items"]
        assert [(f["outcome"], f["task_id"]) for f in fires] == [("triggered", task["id"])]
        assert listed_ids(client, schedule=schedule["id"]) == [task["id"]]
        assert task["schedule_id"] == schedule["id"]
        for path, params in [  # PostgreSQL's text holds no NUL: the client's mistake, a 422
            ("/tasks", {"schedule": "\x00"}),
            ("/tasks", {"batch": "a\x00"}),
            ("/dashboard/tasks", {"name": "\x00"}),
            ("/dashboard/schedules/%00", {}),
        ]:
            refused = client.get(path, params=params)
            assert refused.status_code == 422, (path, params, refused.text)
            assert "NUL" in refused.json()["detail"] or "NUL" in refused.text
        assert client.post("/schedules", json=hourly()).status_code == 409
        assert client.delete(f"/schedules/{schedule['id']}").status_code == 204
        assert client.get("/schedules").json()["items"] == []


@pytest.mark.slow
def test_three_processes_fire_a_one_second_schedule_for_half_a_minute(
    spawn: Any, tmp_path: Path
) -> None:
    """`conveyor serve` and two `conveyor worker` processes on one SQLite file, each firing
    schedules (no leader): a one-second schedule for 30 s makes exactly one task per second,
    no gap, none twice, none missed, every one completed."""
    port = free_port()
    info = {"CONVEYOR_LOG_LEVEL": "info"}
    spawn("serve", "--port", str(port), "--no-access-log", ready="Uvicorn running on", **info)
    spawn("worker", ready="worker running", **info)
    spawn("worker", ready="worker running", **info)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        body = {"name": "tick", "task": "demo.echo", "args": {"value": 1}, "every_s": 1}
        created = client.post("/schedules", json=body)
        assert created.status_code == 201, created.text
        path = f"/schedules/{created.json()['id']}"

        def fires() -> list[dict[str, Any]]:
            return list(client.get(f"{path}/fires", params={"limit": 200}).json()["items"])

        wait_until(lambda: len(fires()) >= 30, 90, "30 fires")
        assert client.post(f"{path}/pause").status_code == 200
        recorded = fires()
        tasks = [client.get(f"/tasks/{f['task_id']}").json() for f in recorded]
        listed = client.get("/tasks", params={"limit": 500}).json()["items"]
    assert len(recorded) >= 30 and {f["outcome"] for f in recorded} == {"fired"}, recorded
    planned = sorted(datetime.fromisoformat(f["fire_at"]).timestamp() for f in recorded)
    assert {round(b - a, 6) for a, b in itertools.pairwise(planned)} == {1.0}, "no gap"
    ids = {f["task_id"] for f in recorded}
    assert len(ids) == len(recorded) == len(listed), "one task per fire, and no other task"
    assert {t["id"] for t in listed} == ids
    assert all(t["status"] in ("queued", "running", "completed") for t in tasks)
