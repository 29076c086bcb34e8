from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from conveyor import Conveyor, Settings
from conveyor.status import TaskStatus

from . import tasks
from .services import PostgresServer, RabbitMQServer, RedisServer

# "celery" uses Redis as the broker, "celery-amqp" RabbitMQ; both use PostgreSQL.
ENGINES = ["local", "celery", "celery-amqp"]
# Modules whose tests run on every engine; the others run on the embedded one.
EVERY_ENGINE = {"test_engine_contract"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        module = metafunc.module.__name__.rpartition(".")[2]
        engines = ENGINES if module in EVERY_ENGINE else ["local"]
        metafunc.parametrize("engine", engines, indirect=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()
    server.remove()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq")).start()
    yield server
    server.stop()


@pytest.fixture
def engine_settings(engine: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """What the engine needs beyond the defaults: for Celery, a new database and queue."""
    if engine == "local":
        return {"engine": "local"}
    postgres: PostgresServer = request.getfixturevalue("postgres")
    if engine == "celery-amqp":
        broker_url = request.getfixturevalue("rabbitmq").url()
    else:
        broker_url = request.getfixturevalue("redis_server").url()
    return {
        "engine": "celery",
        "database_url": postgres.create_database(),
        "broker_url": broker_url,
        "celery_queue": f"q-{uuid.uuid4().hex[:10]}",
        "sweep_s": 0.05,
        "republish_after_s": 3.0,
    }


@pytest.fixture
def make_settings(
    tmp_path: Path, engine: str, engine_settings: dict[str, Any]
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path,
            "lease_s": 2.0,
            "poll_s": 0.02,
            "shutdown_grace_s": 0.5,
            "process_workers": 2,
            "process_warmup": False,
            **engine_settings,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_yard(make_settings: Callable[..., Settings]) -> Callable[..., Conveyor]:
    def make(*, run_workers: bool = True, **overrides: Any) -> Conveyor:
        yard = Conveyor(make_settings(**overrides), run_workers=run_workers)
        tasks.register(yard)
        return yard

    return make


@pytest.fixture
async def yard(make_yard: Callable[..., Conveyor]) -> AsyncIterator[Conveyor]:
    tasks.ACTIVE.update(now=0, max=0)
    tasks.FAILURES.clear()
    async with make_yard() as started:
        yield started
    for gate in tasks.ASYNC_GATES.values():
        gate.set()
    for thread_gate in tasks.THREAD_GATES.values():
        thread_gate.set()
    tasks.ASYNC_GATES.clear()
    tasks.THREAD_GATES.clear()


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
    client: httpx.Client, task_id: str
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Read the task's event stream to its end (the task is then terminal): the final task JSON
    and every ``(event, data)`` the stream sent."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/tasks/{task_id}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.partition(":")[2])))
    task: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
    return task, events


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


@pytest.fixture
def serve() -> Iterator[Callable[[FastAPI], LiveServer]]:
    servers: list[LiveServer] = []

    def start(app: FastAPI) -> LiveServer:
        server = LiveServer(app)
        servers.append(server.__enter__())
        return server

    yield start
    for server in reversed(servers):
        server.__exit__()
