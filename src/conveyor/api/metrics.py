"""``GET /metrics``: Prometheus text read from the store at scrape time.

Every figure comes from the store, so it is the same whichever process serves the scrape and
however many workers share the store: tasks by type and status, the oldest queued task's age,
live workers by engine. A snapshot is cached for ``CACHE_S`` so that several scrapers (or a
scraper and its retries) cost one read. No task id or tenant is a label: series stay bounded
by the number of task types.

Access: with ``CONVEYOR_METRICS_TOKEN`` set, a scrape must send it as a bearer token; with API
keys set and no metrics token, ``/metrics`` answers ``401`` (the figures span every tenant).
"""

import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..record import WorkerRecord
from ..status import TaskStatus
from ..store.stats import Snapshot
from ..tally import BOUNDS, DESCRIBED

if TYPE_CHECKING:
    from ..core import Conveyor

CACHE_S = 1.0


class StoreCollector(Collector):
    """Turns the last snapshot into metric families (collected synchronously by the client)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot({}, None)
        self.workers: list[WorkerRecord] = []
        self.task_types: list[str] = []
        self.totals: list[tuple[str, str, str, float]] = []

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            "conveyor_tasks", "Tasks in the store by type and status.", labels=["task", "status"]
        )
        names = sorted({name for name, _ in self.snapshot.counts} | set(self.task_types))
        for name in names:
            for status in TaskStatus:
                tasks.add_metric(
                    [name, status.value], self.snapshot.counts.get((name, status.value), 0)
                )
        yield tasks
        oldest = GaugeMetricFamily(
            "conveyor_queued_oldest_age_seconds",
            "Age of the oldest queued task (0 when none is queued).",
        )
        oldest.add_metric([], self.snapshot.oldest_queued_age_s or 0.0)
        yield oldest
        workers = GaugeMetricFamily(
            "conveyor_workers", "Worker processes alive on the store.", labels=["engine"]
        )
        running = GaugeMetricFamily(
            "conveyor_worker_slots",
            "Tasks the live workers can run at once, and run now.",
            labels=["state"],
        )
        by_engine: dict[str, int] = {}
        for worker in self.workers:
            by_engine[worker.engine] = by_engine.get(worker.engine, 0) + 1
        for engine, n in sorted(by_engine.items()):
            workers.add_metric([engine], n)
        running.add_metric(["capacity"], sum(w.concurrency for w in self.workers))
        running.add_metric(["busy"], sum(w.running for w in self.workers))
        yield workers
        yield running
        yield from counted(self.totals)


def counted(totals: list[tuple[str, str, str, float]]) -> Iterator[Metric]:
    """The counters and histograms every process added to the store (``conveyor.tally``)."""
    series: dict[str, dict[str, dict[str, float]]] = {}
    for metric, labels, le, value in totals:
        series.setdefault(metric, {}).setdefault(labels, {})[le] = value
    for metric, (kind, help_text) in sorted(DESCRIBED.items()):
        if kind == "counter":
            family: Metric = CounterMetricFamily(metric, help_text, labels=None)
            for labels, values in sorted(series.get(metric, {}).items()):
                family.add_sample(f"{metric}_total", _labels(labels), values.get("", 0.0))
            yield family
            continue
        histogram = HistogramMetricFamily(metric, help_text, labels=None)
        sums = series.get(f"{metric}_sum", {})
        for labels, buckets in sorted(series.get(metric, {}).items()):
            cumulative, running = [], 0.0
            for bound in BOUNDS:
                running += buckets.get(bound, 0.0)
                cumulative.append((bound, running))
            label_set = _labels(labels)
            for bound, n in cumulative:
                histogram.add_sample(f"{metric}_bucket", {**label_set, "le": bound}, n)
            histogram.add_sample(f"{metric}_count", label_set, running)
            histogram.add_sample(f"{metric}_sum", label_set, sums.get(labels, {}).get("", 0.0))
        yield histogram


def _labels(text: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in orjson.loads(text).items()}


def build_metrics_router(yard: "Conveyor") -> APIRouter:
    settings = yard.settings
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    closed = token is None and bool(settings.tenants_by_key())
    collector = StoreCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    read_at = -CACHE_S
    router = APIRouter()

    def allowed(request: Request) -> None:
        if closed:
            raise HTTPException(
                401, "set CONVEYOR_METRICS_TOKEN to scrape /metrics while API keys are set"
            )
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401, "missing or invalid metrics token", {"WWW-Authenticate": "Bearer"}
            )

    @router.get(
        "/metrics",
        summary="Prometheus metrics, read from the store",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"description": "No token"}},
    )
    async def metrics(request: Request) -> Response:
        nonlocal read_at
        allowed(request)
        if time.monotonic() - read_at >= CACHE_S:
            store = yard.store
            collector.snapshot = await store.stats().snapshot()
            collector.workers = await store.workers().alive(lease_s=settings.lease_s)
            collector.task_types = sorted(yard.task_types)
            collector.totals = await store.stats().totals()
            read_at = time.monotonic()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
