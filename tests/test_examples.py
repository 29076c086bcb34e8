"""Every example app runs, served by uvicorn on loopback, and does what its docstring says."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from .support.live import LiveServer, follow


@pytest.fixture
def example(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, serve: Callable[[FastAPI], LiveServer]
) -> Callable[[str], tuple[ModuleType, httpx.Client]]:
    clients: list[httpx.Client] = []
    monkeypatch.setenv("CONVEYOR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVEYOR_POLL_S", "0.02")

    def load(name: str) -> tuple[ModuleType, httpx.Client]:
        module = importlib.reload(importlib.import_module(f"examples.{name}"))
        client = serve(module.app).client()
        clients.append(client)
        return module, client

    yield load  # type: ignore[misc]
    for client in clients:
        client.close()


def finished(client: httpx.Client, task_id: str) -> dict[str, Any]:
    return follow(client, task_id)[0]


def test_fire_and_forget(example: Any, tmp_path: Path) -> None:
    _, client = example("fire_and_forget")
    response = client.post("/send-notification/ada@example.com")
    assert response.status_code == 202
    body = response.json()
    assert body["message"] == "Notification sent in the background"
    assert finished(client, body["task_id"])["status"] == "completed"
    log = (tmp_path / "notifications.log").read_text()
    assert log == "notification for ada@example.com: some notification\n"


def test_progress_polling(example: Any) -> None:
    _, client = example("progress_polling")
    response = client.post("/reports", params={"pages": 4, "seconds_per_page": 0.05})
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert response.headers["location"] == f"/reports/{task_id}"
    seen = []
    with client.stream("GET", f"/tasks/{task_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: progress"):
                seen.append(client.get(f"/reports/{task_id}").json()["progress"])
    final = client.get(f"/reports/{task_id}").json()
    assert final == {
        "status": "completed",
        "progress": 100.0,
        "message": "page 4 of 4",
        "result": {"pages": 4},
    }
    assert seen and seen == sorted(seen)
    assert client.get("/reports/00000000-0000-4000-8000-000000000000").status_code == 404
    assert client.post("/reports", params={"pages": 0}).status_code == 422


def test_failing_task(example: Any, caplog: pytest.LogCaptureFixture) -> None:
    _, client = example("failing_task")
    with caplog.at_level(logging.INFO, logger="conveyor"):
        task_id = client.post("/imports", json={"rows": ["1", "2", "x"]}).json()["task_id"]
        task = finished(client, task_id)
    assert task["status"] == "failed"
    assert task["error"]["type"] == "ValueError"
    assert task["error"]["message"] == "row 3 is not a number: 'x'"
    assert "import_rows" in task["error"]["traceback"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "row 3 is not a number" in logged and task_id in logged
    ok = client.post("/imports", json={"rows": ["1", "2"]}).json()["task_id"]
    assert finished(client, ok)["result"] == 3


def test_timeout(example: Any) -> None:
    _, client = example("timeout_task")
    slow = client.post("/fetch", params={"delay_s": 30}).json()["task_id"]
    quick = client.post("/fetch", params={"delay_s": 0}).json()["task_id"]
    assert finished(client, quick)["result"] == "fetched"
    task = finished(client, slow)
    assert task["status"] == "failed" and task["error"]["type"] == "TimeoutError"


def test_limited_concurrency(example: Any) -> None:
    module, client = example("limited_concurrency")
    ids = [client.post("/renders").json()["task_id"] for _ in range(8)]
    running_counts = [
        len(client.get("/tasks", params={"status": "running"}).json()["items"]) for _ in range(5)
    ]
    assert [finished(client, task_id)["status"] for task_id in ids] == ["completed"] * 8
    assert max(running_counts) <= module.MAX_RENDERS
    assert 1 <= module.peak <= module.MAX_RENDERS


def test_readme_first_example_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, serve: Callable[[FastAPI], LiveServer]
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## A first example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("CONVEYOR_DATA_DIR", str(tmp_path))
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    with serve(namespace["app"]).client() as client:
        response = client.post("/process", params={"data": "x"})
        assert response.status_code == 202
        task = finished(client, response.json()["task_id"])
    assert task["status"] == "completed" and task["result"] == "Processed: x"
    assert task["max_attempts"] == 4


def test_resize_image_tutorial(example: Any) -> None:
    import base64

    from .support.images import RED, close, encode, open_bytes, quadrants

    _, client = example("resize_image")
    photo = encode(quadrants(400, 300), "JPEG", quality=95)
    response = client.post("/resize-image/", files={"file": ("photo.jpg", photo, "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "Processing" and set(body) == {"task_id", "status"}
    assert client.get(f"/resize-status/{body['task_id']}").json()["status"] in {
        "Processing",
        "Completed",
    }
    finished(client, body["task_id"])
    done = client.get(f"/resize-status/{body['task_id']}").json()
    assert set(done) == {"task_id", "status", "thumbnail"} and done["status"] == "Completed"
    thumbnail = open_bytes(base64.b64decode(done["thumbnail"]))
    assert thumbnail.format == "JPEG" and thumbnail.size == (100, 75)
    assert close(thumbnail.convert("RGB").getpixel((2, 2)), RED, 60)
    refused = client.post("/resize-image/", files={"file": ("a.txt", b"hello", "text/plain")})
    assert refused.status_code == 415
    cut = client.post("/resize-image/", files={"file": ("c.jpg", photo[:3000], "image/jpeg")})
    failed_id = cut.json()["task_id"]
    finished(client, failed_id)
    failed = client.get(f"/resize-status/{failed_id}").json()
    assert failed["status"] == "Failed" and "truncated" in failed["error"]
    assert client.get("/resize-status/00000000-0000-4000-8000-000000000000").status_code == 404


def test_periodic_ingest(
    example: Any, monkeypatch: pytest.MonkeyPatch, serve: Callable[[FastAPI], LiveServer]
) -> None:
    from .support.api_server import Upstream, build_api

    upstream = Upstream()
    upstream.fill(95)
    api = serve(build_api(upstream))
    monkeypatch.setenv("SOURCE_URL", f"{api.url}/next")
    monkeypatch.setenv("FETCH_EVERY_S", "1")
    monkeypatch.setenv("CONVEYOR_INGEST_ALLOW_HOSTS", "127.0.0.1")
    _, client = example("periodic_ingest")

    # each fetch starts with the first page (no query): two of them, two fires recorded
    upstream.wait_until(lambda asked: asked.count("/next?") >= 2)
    fires = [f for f in client.get("/items/fetches").json() if f["task_id"]]
    first, second = sorted(fires, key=lambda f: f["fire_at"])[:2]
    assert finished(client, first["task_id"])["result"]["inserted"] == 95
    later = finished(client, second["task_id"])["result"]
    assert later["inserted"] == 0 and later["unchanged"] == 95, "nothing twice"
    stored = client.get("/items", params={"limit": 1000}).json()
    assert sorted(r["id"] for r in stored) == list(range(1, 96))


def test_welcome_emails(
    example: Any, monkeypatch: pytest.MonkeyPatch, serve: Callable[[FastAPI], LiveServer]
) -> None:
    from .support.smtp_server import SmtpServer

    with SmtpServer() as smtp:
        monkeypatch.setenv("CONVEYOR_SMTP_URL", smtp.url)
        _, client = example("welcome_emails")
        ok = client.post("/signup", json={"email": "ada@example.com", "name": "Ada"})
        assert ok.status_code == 202
        bounced = client.post("/signup", json={"email": "bounce@example.com", "name": "Bo"})
        assert finished(client, ok.json()["task_id"])["status"] == "completed"
        assert finished(client, bounced.json()["task_id"])["status"] == "failed"
        status = client.get(f"/signup/{ok.json()['task_id']}").json()
        assert status["status"] == "sent" and "queued as" in status["smtp_reply"]
        refused = client.get(f"/signup/{bounced.json()['task_id']}").json()
        assert refused["status"] == "failed" and refused["smtp_reply"].startswith("550")
        assert refused["attempts"] == 1, "a 5xx reply is not retried"
        ((rcpts, message),) = smtp.handler.wait_for(1)
        assert rcpts == ["ada@example.com"] and message["Subject"] == "Welcome, Ada"
        bad = client.post("/signup", json={"email": "not an address", "name": "X"})
        assert bad.status_code == 422
