"""Apps served by a real uvicorn on loopback, and what tests read from them."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from conveyor import Conveyor, Settings
from conveyor.status import TaskStatus


def service_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for the ready service in a test: short leases and polls, one child process."""
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "lease_s": 2.0,
        "poll_s": 0.02,
        "shutdown_grace_s": 0.5,
        "process_workers": 1,
        "process_warmup": False,
    }
    return Settings(**(values | overrides))


async def wait_for_status(
    yard: Conveyor, task_id: str, status: TaskStatus, timeout_s: float = 10.0
) -> None:
    """Wait (on change notifications) until the task reaches ``status``."""
    import anyio

    with anyio.fail_after(timeout_s):
        async for record in yard.watch(task_id):
            if record.status is status:
                return
    raise AssertionError(f"task {task_id} ended without reaching {status}")


def follow(
    client: httpx.Client, task_id: str, *, kind: str = "tasks"
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Read the task's (or with ``kind="batches"``, the batch's) event stream to its end: the
    final JSON and every ``(event, data)`` the stream sent."""
    events = read_events(client, f"/{kind}/{task_id}/events")
    found: dict[str, Any] = client.get(f"/{kind}/{task_id}").json()
    return found, events


def read_events(
    client: httpx.Client,
    path: str,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(event, data)`` of the Server-Sent Events stream at ``path``: to its end, or up to
    the first whose data satisfies ``until`` (then the stream is closed)."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", path) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.partition(":")[2])))
                if until is not None and until(events[-1][1]):
                    return events
    if until is not None:
        raise AssertionError(f"{path} ended before the awaited event: {events[-1:]}")
    return events


def most_in_any_window(times: Sequence[float], window_s: float) -> int:
    """The largest number of ``times`` inside one half-open window ``[t, t + window_s)``."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, moment in enumerate(ordered):
        while moment - ordered[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server(uvicorn.Server):
    """uvicorn's server, telling when its socket is bound (or that startup failed)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


class LiveServer:
    """A FastAPI app served by a real uvicorn on a loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        if not self.server.ready.wait(30) or not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=20.0, **kwargs)


def listed(client: httpx.Client) -> dict[int, dict[str, Any]]:
    response = client.get("/workers")
    assert response.status_code == 200, response.text
    return {worker["pid"]: worker for worker in response.json()["items"]}


def counted(client: httpx.Client, sample: str, **labels: str) -> float:
    """A sample of ``GET /metrics`` (0 when absent), parsed by prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return 0.0
