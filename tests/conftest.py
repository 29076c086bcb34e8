from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor import Conveyor, Settings

from .support import tasks
from .support.live import LiveServer, service_settings
from .support.process import Process
from .support.services import PostgresServer, RabbitMQServer, RedisServer
from .support.smtp_server import SmtpServer

# "celery" uses Redis as the broker, "celery-amqp" RabbitMQ; both use PostgreSQL.
ENGINES = ["local", "celery", "celery-amqp"]
# Modules whose tests run on every engine; the others run on the embedded one.
EVERY_ENGINE = {"test_engine_contract"}
# Modules whose tests run on the embedded engine and on Celery with Redis.
BOTH_ENGINES = {"test_batches", "test_rates", "test_email_requests"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        module = metafunc.module.__name__.rpartition(".")[2]
        engines = (
            ENGINES
            if module in EVERY_ENGINE
            else ENGINES[:2]
            if module in BOTH_ENGINES
            else ["local"]
        )
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


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server on loopback (aiosmtpd), answering by address (see its module)."""
    with SmtpServer() as server:
        yield server


@pytest.fixture
def make_client(
    serve: Callable[[FastAPI], LiveServer],
    tmp_path: Path,
    smtp: SmtpServer,
    engine_settings: dict[str, Any],
) -> Iterator[Callable[..., httpx.Client]]:
    """A client of the ready service (on the module's engine) that sends mail to ``smtp``."""
    from conveyor.service import create_app

    clients: list[httpx.Client] = []

    def make(**overrides: Any) -> httpx.Client:
        values = {
            "smtp_url": smtp.url,
            "smtp_from": "news@example.com",
            "retry_base_s": 0,
            "email_retries": 2,
            **engine_settings,
        }
        client = serve(create_app(service_settings(tmp_path, **(values | overrides)))).client()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start `conveyor` subprocesses on the test's data folder (killed at the end): `spawn(*args,
    ready=line, **env)`."""
    processes: list[Process] = []
    env = {
        **os.environ,
        "CONVEYOR_DATA_DIR": str(tmp_path),
        "CONVEYOR_LEASE_S": "2",
        "CONVEYOR_POLL_S": "0.05",
        "CONVEYOR_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }

    def start(*args: str, ready: str, **extra_env: str) -> Process:
        process = Process(list(args), env | extra_env, ready)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
