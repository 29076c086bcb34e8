"""The HTTP API over a real uvicorn on loopback, with the ready service's demo task types."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.live import LiveServer, follow, read_events, service_settings

JSON = {"content-type": "application/json"}


@pytest.fixture
def server(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> LiveServer:
    return serve(create_app(service_settings(tmp_path)))


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def submit(client: httpx.Client, name: str, args: dict[str, Any], **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    return client.post("/tasks", json={"name": name, "args": args, **extra}, headers=headers)


def wait_done(client: httpx.Client, task_id: str) -> dict[str, Any]:
    return follow(client, task_id)[0]


def test_submit_poll_and_result(client: httpx.Client) -> None:
    response = submit(client, "demo.echo", {"value": {"hello": "world"}})
    assert response.status_code == 202
    task = response.json()
    assert response.headers["location"] == f"/tasks/{task['id']}"
    assert task["status"] == "queued" and task["name"] == "demo.echo"
    assert set(task) >= {
        "id",
        "name",
        "status",
        "progress",
        "message",
        "args",
        "result",
        "error",
        "attempts",
        "max_attempts",
        "priority",
        "created_at",
        "started_at",
        "finished_at",
        "run_at",
        "links",
    }
    assert task["links"] == {
        "self": f"/tasks/{task['id']}",
        "events": f"/tasks/{task['id']}/events",
        "result": f"/tasks/{task['id']}/result",
    }
    done = wait_done(client, task["id"])
    assert done["status"] == "completed" and done["result"] == {"hello": "world"}
    assert done["finished_at"].endswith("Z")
    result = client.get(f"/tasks/{task['id']}/result")
    assert result.status_code == 200 and result.json() == {"hello": "world"}


def test_events_stream_status_and_progress(client: httpx.Client) -> None:
    task = submit(client, "demo.sleep", {"seconds": 0.3, "steps": 3}).json()
    _, events = follow(client, task["id"])
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "status"
    assert events[-1][1]["status"] == "completed"
    assert events[-1][1]["result"] == {"slept": 0.3}
    progress = [data["progress"] for kind, data in events if kind == "progress"]
    assert progress and progress == sorted(progress) and max(progress) > 0
    assert any(data.get("message", "") and "step" in data["message"] for _, data in events)


def test_failure_is_reported_with_its_error(client: httpx.Client) -> None:
    task = submit(client, "demo.fail", {"message": "no luck"}).json()
    done = wait_done(client, task["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "ValueError" and done["error"]["message"] == "no luck"
    assert "Traceback" in done["error"]["traceback"]
    result = client.get(f"/tasks/{task['id']}/result")
    assert result.status_code == 409 and "ValueError" in result.json()["detail"]
    retried = client.post(f"/tasks/{task['id']}/retry")
    assert retried.status_code == 202 and retried.json()["status"] == "queued"
    assert wait_done(client, task["id"])["attempts"] == 2


def test_cpu_task_runs_in_a_process(client: httpx.Client) -> None:
    task = submit(client, "demo.cpu", {"n": 100_000}).json()
    assert wait_done(client, task["id"])["result"] == 9592


def test_idempotency_key(client: httpx.Client) -> None:
    first = submit(client, "demo.echo", {"value": 1}, headers={"Idempotency-Key": "order-17"})
    again = submit(client, "demo.echo", {"value": 1}, headers={"Idempotency-Key": "order-17"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    # a schedule's fire keys its task "schedule:<id>@<time>": a caller cannot take such a key
    for path, body in [
        ("/tasks", {"name": "demo.echo", "args": {"value": 1}}),
        ("/batches", {"name": "demo.echo", "items": [{"value": 1}]}),
        ("/emails", {"subject": "hi", "text": "hi", "recipients": [{"email": "a@example.com"}]}),
    ]:
        refused = client.post(path, json=body, headers={"Idempotency-Key": "schedule:x@1.0"})
        assert refused.status_code == 422, (path, refused.text)
        problem = refused.json()["detail"][0]
        assert problem["loc"] == ["header", "Idempotency-Key"] and "schedule:" in problem["msg"]
    assert client.get("/tasks?schedule=x").json()["items"] == []


def test_cancel_delete_and_conflicts(client: httpx.Client) -> None:
    task = submit(client, "demo.echo", {"value": 1}, delay_s=3600).json()
    assert client.get(f"/tasks/{task['id']}/result").status_code == 409
    assert client.delete(f"/tasks/{task['id']}").status_code == 409
    cancelled = client.post(f"/tasks/{task['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/tasks/{task['id']}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    assert client.delete(f"/tasks/{task['id']}").status_code == 204
    assert client.get(f"/tasks/{task['id']}").status_code == 404


def test_cancel_running_task(client: httpx.Client) -> None:
    task = submit(client, "demo.sleep", {"seconds": 60, "steps": 600}).json()
    with client.stream("GET", f"/tasks/{task['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: progress"):
                break
    requested = client.post(f"/tasks/{task['id']}/cancel")
    assert requested.status_code == 200
    assert wait_done(client, task["id"])["status"] == "cancelled"


def test_list_filters_and_cursor(client: httpx.Client) -> None:
    ids = [submit(client, "demo.echo", {"value": i}, delay_s=3600).json()["id"] for i in range(5)]
    page = client.get("/tasks", params={"limit": 2, "name": "demo.echo"}).json()
    assert [t["id"] for t in page["items"]] == ids[::-1][:2]
    seen = [t["id"] for t in page["items"]]
    while page["next_cursor"]:
        page = client.get("/tasks", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [t["id"] for t in page["items"]]
    assert seen == ids[::-1]
    assert len(client.get("/tasks", params={"status": "queued"}).json()["items"]) == 5
    assert client.get("/tasks", params={"status": "completed"}).json()["items"] == []


def test_list_narrowed_to_an_id_prefix_a_time_range_or_a_batch(client: httpx.Client) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    ids = [submit(client, "demo.echo", {"value": i}).json()["id"] for i in range(3)]
    batch = client.post("/batches", json={"name": "demo.echo", "items": [{"value": 9}]}).json()
    after = datetime.now(UTC) + timedelta(seconds=1)

    def listed(**params: Any) -> list[str]:
        response = client.get("/tasks", params=params)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["items"]]

    assert ids[1] in listed(id_prefix=ids[1][:13])
    assert listed(id_prefix=ids[1]) == [ids[1]], "a whole id is a prefix too"
    window = listed(created_after=before.isoformat(), created_before=after.isoformat())
    assert set(ids) < set(window) and batch["id"] not in window
    assert listed(created_after=after.isoformat()) == []
    assert listed(created_before=before.isoformat()) == []
    (item,) = listed(batch=batch["id"])
    assert item not in ids
    for bad, where in [
        ({"id_prefix": ids[0][:7]}, "id_prefix"),
        ({"id_prefix": "ZZZZZZZZ"}, "id_prefix"),
        ({"created_after": "2026-12-06T10:00:00"}, "created_after"),
        ({"created_before": "yesterday"}, "created_before"),
    ]:
        refused = client.get("/tasks", params=bad)
        assert refused.status_code == 422 and where in refused.text, (bad, refused.text)


def test_task_types_and_health(client: httpx.Client) -> None:
    types = {t["name"]: t for t in client.get("/task-types").json()}
    assert {"demo.echo", "demo.sleep", "demo.fail", "demo.cpu"} <= set(types)
    sleep_schema = types["demo.sleep"]["args_schema"]
    assert sleep_schema["required"] == ["seconds"]
    assert types["demo.cpu"]["options"]["executor"] == "process"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_openapi_documents_every_response(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths["/tasks"]["post"]["responses"]) >= {"200", "202", "413", "415", "422", "429"}
    assert set(paths["/tasks/{task_id}"]["get"]["responses"]) >= {"200", "404", "422"}
    assert set(paths["/tasks/{task_id}/cancel"]["post"]["responses"]) >= {"200", "404", "409"}
    assert set(paths["/tasks/{task_id}"]["delete"]["responses"]) >= {"204", "404", "409"}
    assert "text/event-stream" in json.dumps(paths["/tasks/{task_id}/events"]["get"])


def test_an_apps_middleware_and_handlers_see_submissions(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    """POST /tasks is served on a lighter path than other routes: a user's middleware, its
    exception handlers and a router included under a prefix still apply to it."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from conveyor import Conveyor

    seen: list[tuple[str, int]] = []

    async def record(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        seen.append((request.url.path, response.status_code))
        response.headers["x-seen-by"] = "middleware"
        return response

    async def teapot_for_415(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = 418 if exc.status_code == 415 else exc.status_code
        return JSONResponse({"detail": exc.detail, "handled": True}, status)

    service = create_app(service_settings(tmp_path / "service"))
    service.middleware("http")(record)
    yard = Conveyor(service_settings(tmp_path / "own"))

    @yard.task(name="own.echo")
    async def echo(ctx: Any, value: int) -> int:
        return value

    own = FastAPI(lifespan=yard.lifespan)
    own.include_router(yard.router(), prefix="/jobs")  # links follow (see the test below)
    own.middleware("http")(record)
    own.add_exception_handler(StarletteHTTPException, teapot_for_415)  # type: ignore[arg-type]
    for app, path, name in [(service, "/tasks", "demo.echo"), (own, "/jobs/tasks", "own.echo")]:
        with serve(app).client() as client:
            created = client.post(path, json={"name": name, "args": {"value": 1}})
            assert created.status_code == 202, created.text
            assert created.headers["x-seen-by"] == "middleware"
            assert created.headers["location"] == f"{path}/{created.json()['id']}"
            refused = client.post(path, json={"name": name, "args": {}})
            assert refused.status_code == 422 and refused.headers["x-seen-by"] == "middleware"
            assert refused.json()["detail"][0]["loc"] == ["body", "args", "value"]
            not_json = client.post(path, content=b"value=1")
            assert not_json.headers["x-seen-by"] == "middleware"
            assert seen[-3:] == [(path, 202), (path, 422), (path, not_json.status_code)]
    assert not_json.status_code == 418 and not_json.json()["handled"] is True  # own handler
    assert seen[2][1] == 415  # the service's own answer


def test_links_and_locations_follow_where_the_api_is_served(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    """Mounted under a path, included under a prefix or both: every `Location` and link of an
    answer is where the API answers."""
    from conveyor import Conveyor

    service = create_app(service_settings(tmp_path / "service"))
    outer = FastAPI(lifespan=service.router.lifespan_context)
    outer.mount("/api", service)
    yard = Conveyor(service_settings(tmp_path / "own"))

    @yard.task(name="own.echo")
    async def echo(ctx: Any, value: int) -> int:
        return value

    own = FastAPI(lifespan=yard.lifespan)
    own.include_router(yard.router(prefix="/v1"), prefix="/jobs")
    for app, base, name in [(outer, "/api", "demo.echo"), (own, "/jobs/v1", "own.echo")]:
        with serve(app).client() as client:
            task = client.post(f"{base}/tasks", json={"name": name, "args": {"value": 1}})
            assert task.status_code == 202, task.text
            links = task.json()["links"]
            assert task.headers["location"] == links["self"] == f"{base}/tasks/{task.json()['id']}"
            assert client.get(links["self"]).status_code == 200
            read_events(client, links["events"])
            done = client.get(links["self"]).json()
            assert done["links"]["result"].startswith(f"{base}/tasks/")
            assert client.get(done["links"]["result"]).json() == 1
            listed = client.get(f"{base}/tasks").json()["items"][0]
            assert listed["links"]["self"] == links["self"]
            batch = client.post(f"{base}/batches", json={"name": name, "items": [{"value": 2}]})
            assert batch.headers["location"] == f"{base}/batches/{batch.json()['id']}"
            assert client.get(batch.headers["location"]).status_code == 200
            item = client.get(f"{batch.headers['location']}/items").json()["items"][0]
            assert item["links"]["batch"] == batch.headers["location"]
            schedule = client.post(
                f"{base}/schedules",
                json={"name": "s", "task": name, "args": {"value": 3}, "every_s": 3600},
            )
            assert schedule.headers["location"] == schedule.json()["links"]["self"]
            assert schedule.headers["location"].startswith(f"{base}/schedules/")
            fired = client.post(f"{schedule.headers['location']}/trigger")
            assert fired.headers["location"].startswith(f"{base}/tasks/")
            assert client.get(fired.json()["links"]["schedule"]).status_code == 200
            if app is not outer:
                continue
            # the ready service's own routes
            email = client.post(
                "/api/emails",
                json={
                    "from": "app@example.com",
                    "subject": "hi",
                    "text": "hi",
                    "recipients": [{"email": "a@example.com"}],
                },
            )
            assert email.status_code == 202, email.text
            assert email.headers["location"] == f"/api/emails/{email.json()['id']}"
            assert all(link.startswith("/api/emails/") for link in email.json()["links"].values())
            source = client.post(
                "/api/ingest/sources",
                json={"name": "s", "url": "https://example.com/items", "primary_key": ["id"]},
            )
            assert source.status_code == 201, source.text
            assert source.headers["location"] == source.json()["links"]["self"]
            assert source.json()["links"]["self"].startswith("/api/ingest/sources/")
            run = client.post(source.json()["links"]["run"])
            assert run.headers["location"].startswith("/api/tasks/")


def test_tenants_are_isolated(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="alpha:ka,beta:kb")))
    with (
        server.client(headers={"Authorization": "Bearer ka"}) as alpha,
        server.client(headers={"Authorization": "Bearer kb"}) as beta,
        server.client() as anonymous,
    ):
        assert anonymous.get("/tasks").status_code == 401
        assert anonymous.get("/tasks", headers={"Authorization": "Bearer nope"}).status_code == 401
        task = submit(alpha, "demo.echo", {"value": "secret"}).json()
        assert alpha.get(f"/tasks/{task['id']}").status_code == 200
        for method, path in [
            ("GET", f"/tasks/{task['id']}"),
            ("GET", f"/tasks/{task['id']}/result"),
            ("GET", f"/tasks/{task['id']}/events"),
            ("POST", f"/tasks/{task['id']}/cancel"),
            ("POST", f"/tasks/{task['id']}/retry"),
            ("DELETE", f"/tasks/{task['id']}"),
        ]:
            assert beta.request(method, path).status_code == 404, (method, path)
        assert beta.get("/tasks").json()["items"] == []
        assert [t["id"] for t in alpha.get("/tasks").json()["items"]] == [task["id"]]
        # the same idempotency key in two tenants makes two tasks
        key = {"Idempotency-Key": "same"}
        a = submit(alpha, "demo.echo", {"value": 1}, headers=key).json()
        b = submit(beta, "demo.echo", {"value": 1}, headers=key).json()
        assert a["id"] != b["id"]


def test_health_tells_an_anonymous_caller_only_that_the_service_is_up(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="alpha:ka,beta:kb")))
    with (
        server.client(headers={"Authorization": "Bearer ka"}) as alpha,
        server.client(headers={"Authorization": "Bearer kb"}) as beta,
        server.client() as anonymous,
    ):
        wait_done(alpha, submit(alpha, "demo.echo", {"value": 1}).json()["id"])
        assert anonymous.get("/health").json() == {"status": "ok"}
        wrong = anonymous.get("/health", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 200 and wrong.json() == {"status": "ok"}
        assert alpha.get("/health").json()["tasks"]["completed"] == 1
        own = beta.get("/health").json()
        assert own["tasks"]["completed"] == 0, "another tenant's tasks are not counted"
        assert own["abandoned_threads"] == 0


def test_without_a_key_the_openapi_document_names_no_task_type(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="alpha:ka")))
    with server.client(headers={"Authorization": "Bearer ka"}) as alpha, server.client() as anon:
        public = anon.get("/openapi.json")
        assert public.status_code == 200 and "/tasks" in public.json()["paths"]
        assert "demo.sleep" not in public.text and "seconds" not in public.text
        assert anon.get("/task-types").status_code == 401
        full = alpha.get("/openapi.json").json()
        assert "demo.sleep" in json.dumps(full["paths"]["/tasks"]["post"]["requestBody"])
        docs = anon.get("/docs")
        assert docs.status_code == 200 and "/openapi.json" in docs.text
