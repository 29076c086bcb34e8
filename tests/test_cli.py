"""The ``conveyor`` command: submitting and following tasks, settings, and loading apps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from conveyor.cli import app as cli
from conveyor.errors import ConfigurationError
from conveyor.loader import load_yard
from conveyor.service import create_app

from .support.live import LiveServer, service_settings


@pytest.fixture
def server(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> LiveServer:
    return serve(create_app(service_settings(tmp_path)))


def test_cli_submit_wait_status_list_cancel(server: LiveServer) -> None:
    runner = CliRunner()
    url = ["--url", server.url]
    result = runner.invoke(cli, ["submit", "demo.sleep", "seconds=0.2", "steps=2", "--wait", *url])
    assert result.exit_code == 0, result.output
    assert '"status": "completed"' in result.output
    task_id = json.loads(result.stdout[result.stdout.index("{") :])["id"]
    status = runner.invoke(cli, ["status", task_id], env={"CONVEYOR_URL": server.url})
    assert status.exit_code == 0 and task_id in status.output
    logs = runner.invoke(cli, ["logs", task_id, *url])
    assert logs.exit_code == 0, logs.output
    assert [line.split(" ", 1)[1] for line in logs.output.splitlines()] == [
        "INFO     [attempt 1] step 1 of 2",
        "INFO     [attempt 1] step 2 of 2",
    ]
    failed = runner.invoke(cli, ["submit", "demo.fail", "message=oops", "--wait", *url])
    assert failed.exit_code == 1 and "oops" in failed.output
    failed_id = json.loads(failed.stdout[failed.stdout.index("{") :])["id"]
    again = runner.invoke(cli, ["retry", failed_id, *url])
    assert again.exit_code == 0 and '"status": "queued"' in again.output, again.output
    refused = runner.invoke(cli, ["retry", task_id, *url])  # completed: nothing to retry
    assert refused.exit_code == 1 and "409" in refused.output
    queued = runner.invoke(cli, ["submit", "demo.echo", "value=[1,2]", "--delay-s", "3600", *url])
    queued_id = json.loads(queued.stdout)["id"]
    cancelled = runner.invoke(cli, ["cancel", queued_id, *url])
    assert cancelled.exit_code == 0 and '"status": "cancelled"' in cancelled.output
    listing = runner.invoke(cli, ["list", "--status", "cancelled", *url])
    assert listing.exit_code == 0 and "demo.echo" in listing.output
    everything = runner.invoke(cli, ["list", *url], env={"COLUMNS": "80"})
    assert everything.exit_code == 0
    assert max(len(line) for line in everything.output.splitlines()) <= 80
    for listed in (task_id, queued_id):
        assert listed in everything.output, "an id is never cut: it is copied into `status`"
    bad = runner.invoke(cli, ["submit", "demo.sleep", "seconds=abc", *url])
    assert bad.exit_code == 1 and "seconds" in bad.output
    missing = runner.invoke(cli, ["status", "00000000-0000-0000-0000-000000000000", *url])
    assert missing.exit_code == 1 and "404" in missing.output


def test_cli_schedules(server: LiveServer) -> None:
    import httpx

    body = {"name": "nightly", "task": "demo.echo", "args": {"value": 7}, "cron": "30 2 * * *"}
    created = httpx.post(f"{server.url}/schedules", json=body | {"timezone": "UTC"})
    assert created.status_code == 201, created.text
    runner = CliRunner()
    env = {"CONVEYOR_URL": server.url, "COLUMNS": "200"}
    listing = runner.invoke(cli, ["schedules", "list"], env=env)
    assert listing.exit_code == 0 and "nightly" in listing.output and "30 2 * * *" in listing.output
    upcoming = runner.invoke(cli, ["schedules", "next", "nightly", "--count", "3"], env=env)
    assert upcoming.exit_code == 0, upcoming.output
    assert upcoming.output.count("02:30:00+00:00") == 3, upcoming.output
    paused = runner.invoke(cli, ["schedules", "pause", "nightly"], env=env)
    assert paused.exit_code == 0 and '"enabled": false' in paused.output
    resumed = runner.invoke(cli, ["schedules", "resume", created.json()["id"]], env=env)
    assert resumed.exit_code == 0 and '"enabled": true' in resumed.output
    triggered = runner.invoke(cli, ["schedules", "trigger", "nightly"], env=env)
    assert triggered.exit_code == 0, triggered.output
    task_id = json.loads(triggered.stdout)["id"]
    fires = runner.invoke(cli, ["schedules", "fires", "nightly"], env=env)
    assert fires.exit_code == 0 and "triggered" in fires.output and task_id in fires.output
    missing = runner.invoke(cli, ["schedules", "pause", "no-such-schedule"], env=env)
    assert missing.exit_code == 1 and "no schedule named" in missing.output


def test_cli_help_is_clear() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for command in ["serve", "worker", "submit", "status", "list", "cancel", "schedules"]:
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
            ["worker", "--app", "tests.support.worker_yard:yard"],
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


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param("nomodule", "module:attribute", id="no-colon"),
        pytest.param("no_such_module_xyz:yard", "cannot import", id="missing-module"),
        pytest.param("conveyor:nothing", "no attribute", id="missing-attribute"),
        pytest.param("conveyor:Settings", "not a Conveyor", id="wrong-type"),
    ],
)
def test_worker_app_import_errors(target: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_yard(target)
    result = CliRunner().invoke(cli, ["worker", "--app", target])
    assert result.exit_code == 2 and message in result.output


def test_worker_app_import_string() -> None:
    from examples import limited_concurrency

    assert load_yard("examples.limited_concurrency:yard") is limited_concurrency.yard
