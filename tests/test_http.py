"""The HTTP API over a real uvicorn on loopback, with the ready service's demo task types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from conveyor import Settings
from conveyor.cli import app as cli
from conveyor.service import create_app

from .conftest import LiveServer, follow

JSON = {"content-type": "application/json"}


def service_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "lease_s": 2.0,
        "poll_s": 0.02,
        "shutdown_grace_s": 0.5,
        "process_workers": 1,
        "process_warmup": False,
    }
    return Settings(**(values | overrides))


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


def test_cli_submit_wait_status_list_cancel(server: LiveServer) -> None:
    runner = CliRunner()
    url = ["--url", server.url]
    result = runner.invoke(cli, ["submit", "demo.sleep", "seconds=0.2", "steps=2", "--wait", *url])
    assert result.exit_code == 0, result.output
    assert '"status": "completed"' in result.output
    task_id = json.loads(result.stdout[result.stdout.index("{") :])["id"]
    status = runner.invoke(cli, ["status", task_id], env={"CONVEYOR_URL": server.url})
    assert status.exit_code == 0 and task_id in status.output
    failed = runner.invoke(cli, ["submit", "demo.fail", "message=oops", "--wait", *url])
    assert failed.exit_code == 1 and "oops" in failed.output
    queued = runner.invoke(cli, ["submit", "demo.echo", "value=[1,2]", "--delay-s", "3600", *url])
    queued_id = json.loads(queued.stdout)["id"]
    cancelled = runner.invoke(cli, ["cancel", queued_id, *url])
    assert cancelled.exit_code == 0 and '"status": "cancelled"' in cancelled.output
    listing = runner.invoke(cli, ["list", "--status", "cancelled", *url])
    assert listing.exit_code == 0 and "demo.echo" in listing.output
    bad = runner.invoke(cli, ["submit", "demo.sleep", "seconds=abc", *url])
    assert bad.exit_code == 1 and "seconds" in bad.output
    missing = runner.invoke(cli, ["status", "00000000-0000-0000-0000-000000000000", *url])
    assert missing.exit_code == 1 and "404" in missing.output


def test_cli_help_is_clear() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for command in ["serve", "worker", "submit", "status", "list", "cancel"]:
        assert command in top.output
        sub = runner.invoke(cli, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output


def test_serve_refuses_public_bind_without_keys() -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "CONVEYOR_API_KEYS" in result.output


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        pytest.param(
            ["serve"],
            {"CONVEYOR_ENGINE": "celery"},
            "the celery engine needs a PostgreSQL store",
            id="celery-on-sqlite",
        ),
        pytest.param(
            ["worker", "--app", "tests.worker_yard:yard"],
            {"CONVEYOR_ENGINE": "celery", "CONVEYOR_DATABASE_URL": "sqlite:///./var/x.db"},
            "(SQLite is a file on one machine)",
            id="celery-on-sqlite-in-an-app-module",
        ),
        pytest.param(
            ["worker"],
            {"CONVEYOR_ENGINE": "celery", "CONVEYOR_DATABASE_URL": "postgresql://u:secret@db/x"},
            "the celery engine needs a broker: set CONVEYOR_BROKER_URL=redis://",
            id="celery-without-broker",
        ),
        pytest.param(
            ["serve"],
            {"CONVEYOR_LEASE_S": "0.1"},
            "CONVEYOR_LEASE_S: Input should be greater than 0.5 (got '0.1')",
            id="out-of-range",
        ),
        pytest.param(
            ["serve"],
            {"CONVEYOR_DATABASE_URL": "mysql://u:secret@db/x"},
            "CONVEYOR_DATABASE_URL: database_url must start with sqlite:/// or postgresql://",
            id="unknown-store",
        ),
        pytest.param(
            ["serve"],
            {"CONVEYOR_API_KEYS": "alpha:secret,beta:"},
            "malformed CONVEYOR_API_KEYS entry 'beta:'",
            id="malformed-keys",
        ),
    ],
)
def test_bad_settings_stop_the_command_with_one_clear_line(
    command: list[str], env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", *command],
        env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr, done.stderr
    assert done.stderr.startswith("conveyor: ") and "Traceback" not in done.stderr
    assert "secret" not in done.stderr, "a password or key was printed"
