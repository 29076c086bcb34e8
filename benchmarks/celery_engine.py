"""Conveyor on Celery vs plain Celery, same broker (Redis) and worker settings; prints a table.

- plain: a no-op Celery task (JSON, acks_late, prefetch 1), with no result backend; its run's
  end is seen by counting the "succeeded" lines its worker logs at INFO anyway, so the task
  does nothing at all (bumping a Redis counter in each task instead measured 4 % slower);
- conveyor: `demo.echo` through Conveyor's Celery engine (PostgreSQL store: commit, publish,
  claim, run, record);
- each: N tasks published as fast as one client can, with the worker(s) already up, timed
  from the first publish to the last task done; each round runs both (which goes first
  alternates from round to round); medians reported, and each round's own ratio.
- scaling: the Conveyor run with 1 and 2 prefork worker processes;
- where the two cores go: each run's CPU time per task, from ``/proc``, for the worker's main
  process (Celery's consumer), its pool processes, PostgreSQL, Redis and this client, and the
  time both cores sat idle, and the time the hypervisor gave them to other guests while this
  one had work ("stolen", /proc/stat's steal: how noisy the machine was; medians over the
  rounds, and each round's own);
- how long each of those parts waited for a core (``/proc/<pid>/task/<tid>/schedstat``: time
  ready to run while both cores were busy): every wake-up on a message's path (the pool
  process, its event loop thread, the PostgreSQL backend of its claim) waits its turn there;
- how long each message's task ran in its pool process (the median of Celery's "succeeded in"
  log lines; for Conveyor, the claim and the run; for the plain no-op, next to nothing): with
  prefetch 1, Celery's main process has at most one message per pool process, so this time is
  part of every message's round trip.

Run: `.venv/bin/python -m benchmarks.celery_engine` (starts its own PostgreSQL and Redis).
PostgreSQL runs as in the tests (fsync and synchronous_commit off): the figures measure CPU and
round trips, not the disk, whose cost on each commit depends on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.services import PostgresServer, RedisServer

from conveyor import Settings, TaskStatus
from conveyor.service import build_yard

from .support import HZ, ROOT, Usage, postmaster_pid, processes

PLAIN_APP = """
import os
from celery import Celery
app = Celery("plain", broker=os.environ["BROKER"], set_as_current=True)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                task_acks_late=True, task_reject_on_worker_lost=True,
                worker_prefetch_multiplier=1, task_default_queue=os.environ["QUEUE"],
                worker_hijack_root_logger=False)

@app.task(name="noop")
def noop(i):
    pass
"""


SEND_GROUP = 200  # the Conveyor client submits this many tasks at once: the plain one sends alike
PROCESSES = ("worker main", "pool", "PostgreSQL", "Redis", "client")  # each has its wait too
# idle: both cores sat idle; stolen: the hypervisor ran something else on them (machine noise)
PARTS = (*PROCESSES, "idle", "stolen")
SUCCEEDED = b" succeeded in "  # what Celery logs (INFO) for each task that ran, and how long
HELD = "held"  # the median time (ms) a message's task ran in its pool process: see _held_ms
COLUMNS = (*PARTS, HELD)
WAITED = {part: f"{part} waited" for part in PROCESSES}
LABELS = {
    "plain": "plain, 2 processes",
    "conveyor": "Conveyor, 2 processes",
    "single": "Conveyor, 1 process",
}


# One side's run: tasks per second, and what it used (ms per task of each part, and ``HELD``)
Result = tuple[float, dict[str, float]]


def _idle_and_stolen_s() -> tuple[float, float]:
    """Seconds the machine's cores have sat idle (idle and iowait), and seconds the hypervisor
    gave them to another guest while this one had work (steal), summed over cores."""
    fields = Path("/proc/stat").read_text().split(maxsplit=9)
    return (int(fields[4]) + int(fields[5])) / HZ, int(fields[8]) / HZ


class CpuMeter:
    """CPU time (and time waiting for a core) per task of each part of one run, between
    :meth:`start` and :meth:`stop`."""

    def __init__(self, worker: int, postgres: int, redis_server: int) -> None:
        self.roots = {
            "worker main": worker,
            "PostgreSQL": postgres,
            "Redis": redis_server,
            "client": os.getpid(),
        }
        self.before: dict[int, Usage] = {}
        self.idle_before = self.stolen_before = 0.0

    def start(self) -> None:
        self.before = processes()
        self.idle_before, self.stolen_before = _idle_and_stolen_s()

    def stop(self, n: int) -> dict[str, float]:
        """Milliseconds per task of each part, and of each process part's wait (under
        ``WAITED``); a process started meanwhile counts from zero."""
        after, (idle, stolen) = processes(), _idle_and_stolen_s()
        used = dict.fromkeys((*PARTS, *WAITED.values()), 0.0)
        for pid, now in after.items():
            part = self._part(pid, now.parent)
            if part is not None:
                then = self.before.get(pid, Usage(now.parent, 0.0, 0.0))
                used[part] += now.cpu_s - then.cpu_s
                used[WAITED[part]] += now.waited_s - then.waited_s
        used["idle"] = idle - self.idle_before
        used["stolen"] = stolen - self.stolen_before
        return {key: 1000 * seconds / n for key, seconds in used.items()}

    def _part(self, pid: int, parent: int) -> str | None:
        for part, root in self.roots.items():
            if pid == root:
                return part
        if parent == self.roots["worker main"]:
            return "pool"
        if parent == self.roots["PostgreSQL"]:  # backends and the server's own processes
            return "PostgreSQL"
        return None


def wait_logged(worker: subprocess.Popen[bytes], log: Path, n: int) -> None:
    """Wait until ``worker`` has logged ``n`` tasks as succeeded (reading only what is new);
    raise if it exits first."""
    done = offset = 0
    with log.open("rb") as lines:
        while True:
            lines.seek(offset)
            new = lines.read()
            whole = new.rfind(b"\n") + 1  # a line still being written is read next time
            done += new[:whole].count(SUCCEEDED)
            offset += whole
            if done >= n:
                return
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited after {done} of {n} tasks")
            time.sleep(0.01)


def _held_ms(log: Path) -> float:
    """The median time a message's task ran in its pool process, from the worker's log."""
    lines = re.findall(SUCCEEDED.decode() + r"([0-9.e-]+)s", log.read_text())
    return 1000 * statistics.median(float(seconds) for seconds in lines)


def start_worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a worker logging to ``log`` (a pipe left unread would stall it); wait until ready."""
    with log.open("wb") as out:
        worker = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start:\n" + log.read_text()[-2000:])
        time.sleep(0.05)
    return worker


def stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def plain_round(
    n: int,
    broker: str,
    processes: int,
    work: Path,
    servers: tuple[int, int],
    *,
    task: str = "noop",
    app: str = PLAIN_APP,
    env: dict[str, str] | None = None,
    before_send: Callable[[range], None] | None = None,
) -> Result:
    """N ``task`` messages (argument: their number) through a plain Celery worker running
    ``app``; ``before_send`` is called with each group of numbers before they are sent."""
    queue = f"plain-{uuid.uuid4().hex[:8]}"
    (work / "plain_app.py").write_text(app)
    env = {**os.environ, **(env or {}), "BROKER": broker, "QUEUE": queue, "PYTHONPATH": str(work)}
    worker = start_worker(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "plain_app",
            "worker",
            "--pool=prefork",
            f"--concurrency={processes}",
            f"--queues={queue}",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
        ],
        env,
        work / "plain.log",
    )
    try:
        from celery import Celery

        client = Celery("plain-client", broker=broker, set_as_current=False)
        client.conf.update(task_serializer="json", task_default_queue=queue)
        meter = CpuMeter(worker.pid, *servers)
        meter.start()
        started = time.perf_counter()
        with client.producer_or_acquire() as producer:
            for start in range(0, n, SEND_GROUP):
                numbers = range(start, min(n, start + SEND_GROUP))
                if before_send is not None:
                    before_send(numbers)
                for i in numbers:
                    client.send_task(task, args=(i,), queue=queue, producer=producer)
        wait_logged(worker, work / "plain.log", n)
        rate = n / (time.perf_counter() - started)
        used = meter.stop(n)
    finally:
        stop(worker)
    return rate, {**used, HELD: _held_ms(work / "plain.log")}


async def conveyor_submit(n: int, settings: Settings, meter: CpuMeter) -> Result:
    yard = build_yard(settings, run_workers=False)
    echo = yard.task_types["demo.echo"]
    async with yard:
        meter.start()
        started = time.perf_counter()
        for chunk in range(0, n, SEND_GROUP):
            handles = await asyncio.gather(
                *(echo.submit(i) for i in range(chunk, min(n, chunk + SEND_GROUP)))
            )
        submitted = time.perf_counter() - started
        # Tasks of one priority run in submission order: watch the last one (a lookup by id,
        # as cheap as the plain side's counter), then check that every task is done. Counting
        # 10,000 rows every 50 ms instead cost PostgreSQL a few percent of a core.
        while (await yard.store.get(handles[-1].id)).status is not TaskStatus.COMPLETED:
            await asyncio.sleep(0.01)
        while (await yard.store.count_by_status())[TaskStatus.COMPLETED] < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        used = meter.stop(n)
        print(f"  (conveyor: submitted in {submitted:.2f} s, done in {elapsed:.2f} s)", flush=True)
        return n / elapsed, used


def conveyor_round(
    n: int,
    broker: str,
    pg: PostgresServer,
    processes: int,
    work: Path,
    servers: tuple[int, int],
) -> Result:
    settings = Settings(
        engine="celery",
        database_url=pg.create_database(),
        broker_url=broker,
        celery_queue=f"conveyor-{uuid.uuid4().hex[:8]}",
        data_dir=work,
        max_queued=None,
    )
    env = {
        **os.environ,
        "CONVEYOR_ENGINE": "celery",
        "CONVEYOR_DATABASE_URL": settings.store_url,
        "CONVEYOR_BROKER_URL": broker,
        "CONVEYOR_CELERY_QUEUE": settings.celery_queue,
        "CONVEYOR_DATA_DIR": str(work),
        "CONVEYOR_LOG_LEVEL": "info",
        "PYTHONPATH": str(ROOT),
    }
    worker = start_worker(
        [sys.executable, "-m", "conveyor", "worker", "--processes", str(processes)],
        env,
        work / "conveyor.log",
    )
    try:
        meter = CpuMeter(worker.pid, *servers)
        rate, used = asyncio.run(conveyor_submit(n, settings, meter))
    finally:
        stop(worker)
    return rate, {**used, HELD: _held_ms(work / "conveyor.log")}


def rounds_and_size() -> argparse.Namespace:
    """The command line of a run: ``-n`` tasks per side and round, ``--rounds``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


@contextlib.contextmanager
def bench_servers() -> Iterator[tuple[Path, PostgresServer, RedisServer, tuple[int, int]]]:
    """A working folder, PostgreSQL and Redis for a run, and the two servers' pids (the
    ``servers`` the rounds' CPU meters read); stopped and removed at the end."""
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    pg = PostgresServer().start()
    broker = RedisServer(work / "redis").start()
    assert broker.process is not None
    try:
        yield work, pg, broker, (postmaster_pid(pg.data), broker.process.pid)
    finally:
        broker.stop()
        pg.stop()
        pg.remove()


def main() -> None:
    options = rounds_and_size()
    runs: dict[str, list[Result]] = {side: [] for side in LABELS}
    with bench_servers() as (work, pg, broker, servers):
        for index in range(options.rounds):
            # which side goes first alternates: the machine's speed drifts within a round too
            if index % 2 == 0:
                runs["plain"].append(plain_round(options.n, broker.url(), 2, work, servers))
            runs["conveyor"].append(conveyor_round(options.n, broker.url(), pg, 2, work, servers))
            if index % 2 == 1:
                runs["plain"].append(plain_round(options.n, broker.url(), 2, work, servers))
            runs["single"].append(conveyor_round(options.n, broker.url(), pg, 1, work, servers))
            print(
                "round: "
                + ", ".join(
                    f"{label} {runs[side][-1][0]:.0f}/s ({runs[side][-1][1]['stolen']:.2f} ms "
                    "stolen per task)"
                    for side, label in LABELS.items()
                ),
                flush=True,
            )
        report(options.n, options.rounds, runs)


def report(n: int, rounds: int, runs: dict[str, list[Result]]) -> None:
    plain, conveyor, single = ([rate for rate, _ in runs[side]] for side in LABELS)
    p, c, s = (statistics.median(x) for x in (plain, conveyor, single))
    # each round's own ratio: the machine's speed drifts between rounds more than within one
    paired = [c_ / p_ for c_, p_ in zip(conveyor, plain, strict=True)]
    print(f"\n{n} no-op tasks, Redis broker, prefork, medians of {rounds}")
    print(f"  plain Celery, 2 processes      {p:8.0f} tasks/s")
    met = "met" if c / p >= 0.8 else "not met"
    ratio = f"ratio {c / p:.3f} (≥ 0.8: {met})"
    print(f"  Conveyor on Celery, 2 processes {c:7.0f} tasks/s   {ratio}")
    print(
        f"  ratio within each round: median {statistics.median(paired):.3f} "
        f"({min(paired):.3f} to {max(paired):.3f})"
    )
    print(f"  Conveyor on Celery, 1 process   {s:7.0f} tasks/s   2 vs 1: {c / s:.2f}x")
    print(
        "\nCPU time per task (ms; medians), the time both cores sat idle or were stolen by the"
        "\nhypervisor, and how long a pool process held each message (ms; median):"
    )
    _table(runs, {part: part for part in COLUMNS})
    print(
        "\nTime each part was ready to run but waited for a core (ms per task; medians): on two"
        "\ncores shared by every part, each wake-up on a message's path waits its turn:"
    )
    _table(runs, WAITED)


def _table(runs: dict[str, list[Result]], keys: dict[str, str]) -> None:
    """One row per side: the median over its runs of each measure ``keys`` maps a header to."""
    print("  " + " " * 22 + "".join(f"{header:>12}" for header in keys))
    for side, label in LABELS.items():
        cells = "".join(
            f"{statistics.median(used[key] for _, used in runs[side]):12.2f}"
            for key in keys.values()
        )
        print(f"  {label:22}{cells}")


if __name__ == "__main__":
    main()
