"""``GET /metrics`` read from the store: after a known workload run by two processes sharing
one SQLite file (``conveyor serve`` and a ``conveyor worker``), the figures parsed with
prometheus-client's own parser match what was submitted and run (gauges read from the store,
counters and histograms added to it by each process); the scrape token is enforced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from conveyor.service import create_app

from .support.faults import wait_until
from .support.live import LiveServer, follow, free_port, listed, service_settings
from .support.process import serve_with_worker

pytestmark = pytest.mark.timeout(120)


def scrape(client: httpx.Client, **headers: str) -> dict[str, dict[tuple[Any, ...], float]]:
    """Each family's samples by their sorted label values."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[Any, ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[key] = sample.value
    return found


def test_metrics_match_a_known_workload_across_two_processes(spawn: Any) -> None:
    port = free_port()
    server, worker = serve_with_worker(spawn, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert {server.popen.pid, worker.popen.pid} <= set(listed(client)), "both registered"

        def submit(name: str, args: dict[str, Any], **options: Any) -> str:
            response = client.post("/tasks", json={"name": name, "args": args, **options})
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        done = [submit("demo.echo", {"value": i}) for i in range(6)]
        failed = [submit("demo.fail", {"message": "no"}) for _ in range(2)]
        for _ in range(3):
            submit("demo.echo", {"value": 0}, delay_s=3600)
        finals = [follow(client, task_id)[0]["status"] for task_id in done + failed]
        assert finals == ["completed"] * 6 + ["failed"] * 2

        metrics = scrape(client)
        tasks = metrics["conveyor_tasks"]
        assert tasks[(("status", "completed"), ("task", "demo.echo"))] == 6
        assert tasks[(("status", "failed"), ("task", "demo.fail"))] == 2
        assert tasks[(("status", "queued"), ("task", "demo.echo"))] == 3
        assert tasks[(("status", "running"), ("task", "demo.cpu"))] == 0, "every type, every status"
        health = client.get("/health").json()["tasks"]
        for status, n in health.items():
            assert sum(v for k, v in tasks.items() if ("status", status) in k) == n, status
        assert metrics["conveyor_queued_oldest_age_seconds"][()] >= 0
        assert metrics["conveyor_workers"][(("engine", "local"),)] == 2
        assert metrics["conveyor_worker_slots"][(("state", "capacity"),)] == 3 + 5
        assert all("task_id" not in dict(k) and "tenant" not in dict(k) for k in tasks)

        # counters and histograms: what each process counted, added to the store's totals
        def counted() -> dict[str, dict[tuple[Any, ...], float]]:
            return scrape(client)

        echo, fail = (("task", "demo.echo"),), (("task", "demo.fail"),)

        def all_in() -> bool:
            """Every process's last second of counts added: each flushes on its own."""
            found = counted()
            submitted = found.get("conveyor_tasks_submitted_total", {})
            ended = found.get("conveyor_tasks_finished_total", {})
            return (
                submitted.get(echo, 0) + submitted.get(fail, 0) >= 11
                and ended.get((("outcome", "failed"), *fail), 0)
                + ended.get((("outcome", "completed"), *echo), 0)
                >= 8
            )

        wait_until(all_in, 30, "the server's and the worker's counts in the store")
        metrics = counted()
        assert metrics["conveyor_tasks_submitted_total"][echo] == 9
        assert metrics["conveyor_tasks_submitted_total"][fail] == 2
        finished = metrics["conveyor_tasks_finished_total"]
        assert finished[(("outcome", "completed"), *echo)] == 6
        retried = sum(client.get(f"/tasks/{t}").json()["attempts"] - 1 for t in failed)
        assert metrics.get("conveyor_task_retries_total", {}).get(fail, 0) == retried
        runs = metrics["conveyor_task_run_seconds_count"]
        assert runs[echo] == 6 and runs[fail] == 2 + retried, "one per attempt"
        buckets = metrics["conveyor_task_run_seconds_bucket"]
        assert buckets[(("le", "+Inf"), *echo)] == 6
        assert metrics["conveyor_task_queue_wait_seconds_count"][echo] == 6
        assert metrics["conveyor_task_run_seconds_sum"][echo] >= 0


def test_the_scrape_token(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> None:
    keyed = service_settings(tmp_path / "a", api_keys="alpha:ka", metrics_token="scrape-me")
    with serve(create_app(keyed)).client() as client:
        assert client.get("/metrics").status_code == 401
        tenant = client.get("/metrics", headers={"authorization": "Bearer ka"})
        assert tenant.status_code == 401, "a tenant's key does not open every tenant's figures"
        assert "conveyor_tasks" in str(scrape(client, authorization="Bearer scrape-me"))
    closed = service_settings(tmp_path / "b", api_keys="alpha:ka")
    with serve(create_app(closed)).client() as client:
        refused = client.get("/metrics", headers={"authorization": "Bearer ka"})
        assert refused.status_code == 401 and "CONVEYOR_METRICS_TOKEN" in refused.text
    with serve(create_app(service_settings(tmp_path / "c"))).client() as client:
        assert "conveyor_workers" in scrape(client), "an open service is scraped without a token"
