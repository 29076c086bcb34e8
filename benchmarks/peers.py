"""Conveyor's embedded engine against Huey, Celery and DBOS, in one interleaved run.

Every system runs the same task: a no-op that returns its argument, its result stored. Huey and
Celery use a loopback Redis this benchmark starts (Huey with `notify_result`, so a waiting
client is told at once; Celery with Redis as broker and result backend, JSON); DBOS keeps its
queue in a SQLite file, as Conveyor does (a queue polled every 10 ms). Figures:

- enqueue: `--tasks` tasks submitted one after another by one producer (tasks/s);
- drain: `--tasks` tasks queued first (and `--deep` more, when given, for the drain at depth),
  then 1 or 2 worker processes start; the rate from the workers being ready to the backlog's
  first `--tasks` being done (tasks/s). Worker processes: Conveyor `conveyor worker`-like
  processes (the embedded engine, concurrency 64); Huey consumers of one thread each; a Celery
  prefork worker with 1 or 2 pool processes (prefetch 64); DBOS processes (worker concurrency
  64);
- submit → result: a client submits and waits for the result, `--samples` times, with the
  worker in another process (and, for Conveyor, in the same process): p50 and p99 (ms);
- `POST /tasks`: the ready service with its workers against a bare FastAPI endpoint (wrk, see
  `run.py`): Conveyor's figure only, the peers have no HTTP API.

Rounds (`--rounds`) interleave the systems; medians are printed, and each figure's ratio to the
best peer. The peers' packages are in `benchmarks/requirements-peers.txt` (`make bench-peers`
installs them); they are not Conveyor's dependencies.

Run: `make bench-peers`, or `.venv/bin/python -m benchmarks.peers [--tasks N] [--deep N]
[--rounds K] [--skip dbos]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SYSTEMS = ("conveyor", "huey", "celery", "dbos")
CONCURRENCY = 64
ROOT = Path(__file__).resolve().parent.parent


# the task of each system ----------------------------------------------------------------------


def conveyor_yard(data_dir: Path, *, run_workers: bool) -> Any:
    from conveyor import Conveyor, Settings

    settings = Settings(
        data_dir=data_dir, concurrency=CONCURRENCY, max_queued=None, process_warmup=False
    )
    yard = Conveyor(settings, run_workers=run_workers)

    @yard.task(name="noop")
    async def noop(x: int) -> int:
        return x

    return yard


def huey_app(url: str) -> tuple[Any, Any]:
    from huey import RedisHuey

    huey = RedisHuey("bench", url=url, notify_result=True)

    @huey.task(name="noop")  # the same name whichever module runs it
    def noop(x: int) -> int:
        return x

    return huey, noop


def celery_app(url: str, dbs: str = "0,1") -> tuple[Any, Any]:
    """The Celery app on ``url``'s Redis databases ``dbs`` (the broker's, the results')."""
    from celery import Celery

    broker, backend = dbs.split(",")
    app = Celery("bench", broker=f"{url}/{broker}", backend=f"{url}/{backend}")
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=64,
        result_expires=None,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="noop")
    def noop(x: int) -> int:
        return x

    return app, noop


celery_bench, _ = celery_app(
    os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379"),
    os.environ.get("BENCH_CELERY_DBS", "0,1"),
)
LATENCY_DBS = "2,3"  # Celery's latency runs on databases of its own, empty

DBOS_WORKER = """
import sys, time
from dbos import DBOS
DBOS(config={"name": "bench", "system_database_url": f"sqlite:///{sys.argv[1]}",
             "run_admin_server": False})

@DBOS.workflow()
def noop(x):
    return x

DBOS.launch()
DBOS.register_queue("q", worker_concurrency=64, polling_interval_sec=0.01)
print("ready", flush=True)
time.sleep(3600)
"""

CELERY_LATENCY = """
import sys, time
from benchmarks.peers import celery_app

_, noop = celery_app(sys.argv[1], sys.argv[3])
noop.delay(-1).get(timeout=120)  # warm: the pool's first task, not timed
for i in range(int(sys.argv[2])):
    started = time.perf_counter()
    noop.delay(i).get(timeout=30)
    print(time.perf_counter() - started)
"""

CONVEYOR_WORKER = """
import asyncio, sys
from pathlib import Path
from benchmarks.peers import conveyor_yard

async def main():
    async with conveyor_yard(Path(sys.argv[1]), run_workers=True):
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""

HUEY_WORKER = """
import sys
from huey.consumer import Consumer
from benchmarks.peers import huey_app

huey, _ = huey_app(sys.argv[1])
consumer = Consumer(huey, workers=1, worker_type="thread")
print("ready", flush=True)
consumer.run()
"""


# processes -------------------------------------------------------------------------------------


class Worker:
    """A worker process (its output read only when ``ready`` names the line it prints once
    ready: see :meth:`wait_ready`)."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str | None) -> None:
        self.args, self.ready = args, ready
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if ready else subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its children (Celery's pool) are stopped with it
        )

    def wait_ready(self) -> None:
        assert self.ready is not None and self.popen.stdout is not None
        for line in self.popen.stdout:
            if self.ready in line:
                # read the rest too: a worker that logs each task (Celery at INFO) would block
                # once the pipe is full
                threading.Thread(target=self.popen.stdout.read, daemon=True).start()
                return
        raise RuntimeError(f"{self.args} ended before it was ready")

    def stop(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)


def environment(redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
        "BENCH_REDIS_URL": redis_url,
        "CONVEYOR_LOG_LEVEL": "warning",
    }


def start_workers(
    system: str, n: int, where: str, env: dict[str, str], *, wait: bool = True
) -> list[Worker]:
    """``n`` worker processes, all started before any is waited for (``wait``: until each is
    ready)."""
    python = sys.executable
    if system == "celery":
        args = [python, "-m", "celery", "-A", "benchmarks.peers:celery_bench", "worker"]
        args += ["-P", "prefork", "-c", str(n), "--without-heartbeat", "--without-mingle"]
        args += ["--without-gossip", "-l", "info"]
        workers = [Worker(args, env | {"PYTHONUNBUFFERED": "1"}, " ready." if wait else None)]
    else:
        script = {"conveyor": CONVEYOR_WORKER, "huey": HUEY_WORKER, "dbos": DBOS_WORKER}[system]
        workers = [Worker([python, "-c", script, where], env, "ready" if wait else None)]
        workers += [
            Worker([python, "-c", script, where], env, "ready" if wait else None)
            for _ in range(n - 1)
        ]
    if wait:
        for worker in workers:
            worker.wait_ready()
    return workers


# one system ------------------------------------------------------------------------------------


class Bench:
    """One system's figures in one round, in a folder (and a Redis database) of its own."""

    def __init__(self, system: str, folder: Path, redis_url: str) -> None:
        self.system = system
        self.folder = folder
        self.redis_url = redis_url
        self.env = environment(redis_url)

    # the system's client side

    def worker_target(self) -> str:
        """What a worker process is pointed at: its folder, database file or Redis."""
        if self.system == "huey":
            return self.redis_url
        return str(self.folder / "dbos.db") if self.system == "dbos" else str(self.folder)

    def clear(self) -> None:
        if self.system in ("huey", "celery"):
            import redis

            redis.Redis.from_url(self.redis_url).flushall()
        for path in [*self.folder.glob("conveyor.db*"), *self.folder.glob("dbos.db*")]:
            if path.is_file():  # the doorbell's folder of markers stays
                path.unlink()

    def done(self) -> int:
        """How many tasks have completed, read where each system keeps its results."""
        if self.system == "conveyor":
            with sqlite3.connect(self.folder / "conveyor.db") as db:
                (n,) = db.execute(
                    "SELECT coalesce(sum(n), 0) FROM task_counts WHERE status = 'completed'"
                ).fetchone()
            return int(n)
        if self.system == "dbos":
            with sqlite3.connect(self.folder / "dbos.db") as db:
                (n,) = db.execute(
                    "SELECT count(*) FROM workflow_status WHERE status = 'SUCCESS'"
                ).fetchone()
            return int(n)
        import redis

        if self.system == "huey":
            return int(redis.Redis.from_url(self.redis_url).hlen("huey.results.bench"))
        return int(redis.Redis.from_url(f"{self.redis_url}/1").dbsize())

    def enqueue(self, n: int) -> float:
        """Submit ``n`` tasks one after another (no worker runs); tasks/s."""
        if self.system == "conveyor":

            async def submit() -> float:
                async with conveyor_yard(self.folder, run_workers=False) as yard:
                    started = time.perf_counter()
                    for i in range(n):
                        await yard.submit("noop", {"x": i})
                    return time.perf_counter() - started

            return n / asyncio.run(submit())
        if self.system == "dbos":
            client = self._dbos_client()
            started = time.perf_counter()
            for i in range(n):
                client.enqueue({"queue_name": "q", "workflow_name": "noop"}, i)
            took = time.perf_counter() - started
            client.destroy()
            return n / took
        _, noop = huey_app(self.redis_url) if self.system == "huey" else celery_app(self.redis_url)
        send = noop if self.system == "huey" else noop.delay
        started = time.perf_counter()
        for i in range(n):
            send(i)
        return n / (time.perf_counter() - started)

    def fill(self, n: int) -> None:
        """``n`` more tasks queued, as fast as the system takes them."""
        if self.system == "conveyor":

            async def submit() -> None:
                async with conveyor_yard(self.folder, run_workers=False) as yard:
                    for start in range(0, n, 10_000):
                        items = [{"x": i} for i in range(start, min(start + 10_000, n))]
                        await yard.submit_many("noop", items)

            asyncio.run(submit())
        elif self.system == "huey":
            _, noop = huey_app(self.redis_url)
            for i in range(n):
                noop(i)
        elif self.system == "celery":
            _, noop = celery_app(self.redis_url)
            for i in range(n):
                noop.delay(i)
        else:
            client = self._dbos_client()
            for i in range(n):
                client.enqueue({"queue_name": "q", "workflow_name": "noop"}, i)
            client.destroy()

    def _dbos_client(self) -> Any:
        from dbos import DBOSClient

        if not (self.folder / "dbos.db").exists():  # its schema is made by a launch
            start_workers("dbos", 1, self.worker_target(), self.env)[0].stop()
        return DBOSClient(system_database_url=f"sqlite:///{self.folder / 'dbos.db'}")

    def drain(self, queued: int, processes: int, count: int) -> float:
        """Fill ``queued`` tasks, start ``processes`` workers: tasks/s from the first task seen
        done to ``count`` more (or the whole backlog), polled every 10 ms."""
        self.clear()
        self.fill(queued)
        workers = start_workers(self.system, processes, self.worker_target(), self.env, wait=False)
        try:
            deadline = time.monotonic() + 600
            while (first := self.done()) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.system}: nothing done after 600 s")
                time.sleep(0.01)
            started = time.perf_counter()
            target = min(queued, first + count)
            while (finished := self.done()) < target:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.system}: {finished} of {target} after 600 s")
                time.sleep(0.01)
            return (finished - first) / (time.perf_counter() - started)
        finally:
            for worker in workers:
                worker.stop()

    def latency(self, samples: int, *, same_process: bool = False) -> tuple[float, float]:
        """Submit and wait for the result ``samples`` times: p50, p99 (ms)."""
        if self.system in ("conveyor", "dbos"):  # on Redis the backlog is drained by now
            self.clear()
        took: list[float] = []
        if self.system == "conveyor":

            async def run() -> None:
                async with conveyor_yard(self.folder, run_workers=same_process) as yard:
                    for i in range(samples):
                        started = time.perf_counter()
                        record, _ = await yard.submit("noop", {"x": i})
                        await yard.wait(record.id, timeout_s=30)
                        took.append(time.perf_counter() - started)

            if same_process:
                asyncio.run(run())
            else:
                with self._workers(1):
                    asyncio.run(run())
        elif self.system == "dbos":
            with self._workers(1):
                client = self._dbos_client()
                for i in range(samples):
                    started = time.perf_counter()
                    client.enqueue({"queue_name": "q", "workflow_name": "noop"}, i).get_result()
                    took.append(time.perf_counter() - started)
                client.destroy()
        else:
            with self._workers(1):
                if self.system == "huey":
                    _, noop = huey_app(self.redis_url)
                    noop(-1).get(blocking=True, timeout=120)  # warm, not timed
                    for i in range(samples):
                        started = time.perf_counter()
                        noop(i).get(blocking=True, timeout=30)
                        took.append(time.perf_counter() - started)
                else:  # in an interpreter of its own, as a separate client would be
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            CELERY_LATENCY,
                            self.redis_url,
                            str(samples),
                            LATENCY_DBS,
                        ],
                        env=self.env,
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=600,
                    )
                    if done.returncode != 0:
                        raise RuntimeError(f"the Celery client failed: {done.stderr[-3000:]}")
                    took = [float(t) for t in done.stdout.split()]
        took.sort()
        return statistics.median(took) * 1e3, took[int(len(took) * 0.99) - 1] * 1e3

    @contextmanager
    def _workers(self, n: int) -> Iterator[None]:
        env = self.env | {"BENCH_CELERY_DBS": LATENCY_DBS}
        workers = start_workers(self.system, n, self.worker_target(), env)
        try:
            yield
        finally:
            for worker in workers:
                worker.stop()


# the run ---------------------------------------------------------------------------------------

Figures = dict[str, dict[str, list[float]]]


def measure(bench: Bench, args: argparse.Namespace, found: Figures) -> None:
    def keep(figure: str, value: float) -> None:
        found.setdefault(figure, {}).setdefault(bench.system, []).append(value)
        print(f"  {bench.system:8s} {figure}: {value:,.2f}", flush=True)

    bench.clear()
    keep("enqueue, one producer (tasks/s)", bench.enqueue(args.tasks))
    samples = args.samples if bench.system != "dbos" else min(args.samples, 50)
    p50, p99 = bench.latency(samples)
    keep("submit → result, worker in another process, p50 (ms)", p50)
    keep("submit → result, worker in another process, p99 (ms)", p99)
    if bench.system == "conveyor":
        p50, p99 = bench.latency(samples, same_process=True)
        keep("submit → result, worker in the same process, p50 (ms)", p50)
        keep("submit → result, worker in the same process, p99 (ms)", p99)
    for processes in (1, 2):
        rate = bench.drain(args.tasks, processes, args.tasks)
        keep(f"drain, {processes} worker process(es), {args.tasks:,} queued (tasks/s)", rate)
        if args.deep:
            rate = bench.drain(args.deep, processes, args.tasks)
            keep(f"drain, {processes} worker process(es), {args.deep:,} queued (tasks/s)", rate)


def report(found: Figures, systems: list[str]) -> None:
    peers = [s for s in systems if s != "conveyor"]
    print("\n| figure | " + " | ".join(systems) + " | best peer | ratio |")
    print("| --- |" + " --- |" * (len(systems) + 2))
    for figure, by_system in found.items():
        lower_better = "(ms)" in figure
        medians = {s: statistics.median(v) for s, v in by_system.items()}
        cells = [f"{medians[s]:,.2f}" if s in medians else "—" for s in systems]
        rivals = {s: medians[s] for s in peers if s in medians}
        if rivals and "conveyor" in medians:
            pick: Callable[..., str] = min if lower_better else max
            best = pick(rivals, key=lambda s: rivals[s])
            mine = medians["conveyor"]
            ratio = rivals[best] / mine if lower_better else mine / rivals[best]
            tail = f"{best} | {ratio:.2f}x"
        else:
            tail = "— | —"
        print(f"| {figure} | " + " | ".join(cells) + f" | {tail} |")


def http_ratio(args: argparse.Namespace) -> None:
    from .run import http

    with tempfile.TemporaryDirectory() as tmp:
        figures = http(args.http_seconds, args.rounds, Path(tmp))
    print("\n`POST /tasks` (wrk, 64 connections), medians:")
    for name, (rps, p99) in figures.items():
        print(f"- {name}: {rps:,.0f} requests/s, p99 {p99}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--deep", type=int, default=0, help="also drain at this depth")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http-seconds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS)
    args = parser.parse_args()
    systems = [s for s in SYSTEMS if s not in args.skip]
    sys.path.insert(0, str(ROOT))
    from tests.support.services import RedisServer

    found: Figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(args.rounds):
            print(f"round {round_number + 1}", flush=True)
            for system in systems:
                folder = Path(tmp) / f"{system}-{round_number}"
                folder.mkdir()
                # a Redis server of its own for each system and round
                redis_server = RedisServer(folder / "redis").start()
                try:
                    url = f"redis://127.0.0.1:{redis_server.port}"
                    measure(Bench(system, folder, url), args, found)
                finally:
                    redis_server.stop()
    print(f"\n{args.tasks:,} tasks, {args.rounds} rounds, medians")
    print("ratio: Conveyor's rate / the best peer's; for times, the best peer's / Conveyor's")
    report(found, systems)
    http_ratio(args)


if __name__ == "__main__":
    # run as benchmarks.peers, not __main__: Huey names a task after its function's module,
    # which must be the one its consumers import
    from benchmarks.peers import main as run

    run()
