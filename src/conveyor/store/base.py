"""The contracts of stores: task records (every store) and the publication ledger (PostgreSQL,
for the Celery engine). Every implementation passes one suite, ``tests/test_store_contract.py``."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from ..batch_record import BatchRecord, NewTasks
from ..rates import Rate
from ..record import TaskRecord, WorkerRecord
from ..schedule_record import FireRecord, ScheduleRecord
from ..status import TaskStatus
from ..tasklogs import LogLine
from .rows import NO_FILTER, TaskFilter
from .stats import Snapshot


class Store(Protocol):
    """Durable task records, and the queue operations on them.

    ``owner=None`` means "any tenant" (used by engines); the API always passes the caller's tenant.
    Every write that finishes an attempt is guarded by the claim token ``(worker_id, attempt)``:
    a stale worker's write is dropped, so each attempt is recorded at most once.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def publication_ledger(self) -> PublicationLedger | None:
        """The ledger of broker messages kept beside the tasks (None: this store has none, and
        the Celery engine refuses it)."""
        ...

    def batches(self) -> BatchStore:
        """Where this store keeps batches."""
        ...

    def workers(self) -> WorkerStore:
        """Where worker processes register themselves."""
        ...

    def retention(self) -> RetentionStore:
        """Deleting expired finished tasks."""
        ...

    def logs(self) -> LogStore:
        """Where tasks' own log lines are kept."""
        ...

    def stats(self) -> StatsReader:
        """What a metrics scrape reads."""
        ...

    def schedules(self) -> ScheduleStore:
        """Where this store keeps periodic schedules and their fires."""
        ...

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(task_id)`` when another process changes a task (``""``: changes may
        have been missed). Stores without change notifications never call it; waiters poll."""
        ...

    def watch_queue(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when another process makes a task claimable, so an embedded
        engine's dispatcher claims it at once. Stores that cannot tell never call it (the
        dispatcher polls; the Celery engine learns from its broker)."""
        ...

    async def insert(
        self, record: TaskRecord, *, args_json: str, max_queued: int | None
    ) -> tuple[TaskRecord, bool]:
        """Commit a new task (``args_json``: its arguments as strict JSON); with an idempotency
        key already used, the existing task and False."""
        ...

    async def insert_many(
        self, records: Sequence[TaskRecord], *, args_json: Sequence[str], max_queued: int | None
    ) -> list[TaskRecord]:
        """Commit new tasks (without idempotency keys) in one transaction: all of them, or none
        (``QueueFull`` when they do not all fit under ``max_queued``)."""
        ...

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord: ...

    async def list_tasks(
        self,
        *,
        owner: str | None,
        status: TaskStatus | None = None,
        name: str | None = None,
        limit: int = 50,
        before_seq: int | None = None,
        narrowed: TaskFilter = NO_FILTER,
    ) -> list[TaskRecord]:
        """Newest first; ``narrowed`` to a batch, an id prefix or a submission time range,
        each read through an index or a ``seq`` range (flat in the history's length)."""
        ...

    async def claim(
        self,
        *,
        worker_id: str,
        names: Collection[str],
        limits: Mapping[str, int],
        n: int,
        lease_s: float,
        rates: Mapping[str, Rate] | None = None,
    ) -> list[TaskRecord]:
        """Move up to ``n`` due queued tasks to ``running`` under a lease, best priority first,
        respecting per-type ``limits`` (running at once) and ``rates`` (starts per period) across
        every worker sharing the store."""
        ...

    async def mark_started(self, task_id: str, worker_id: str, attempt: int) -> bool:
        """The held task's run starts now (it waited for a child process since its claim)."""
        ...

    async def set_progress(
        self, task_id: str, worker_id: str, attempt: int, progress: float, message: str | None
    ) -> bool: ...

    async def finish(
        self,
        task_id: str,
        worker_id: str,
        attempt: int,
        *,
        status: TaskStatus,
        result_json: str | None = None,
        blob_json: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Record the outcome of an attempt; False when the claim is no longer this worker's.

        Returns once the outcome is committed. A store may hold it briefly to write it together
        with this process's next claim (PostgreSQL: up to 5 ms, with
        :meth:`PublicationLedger.claim_one`); until then the task stays ``running`` under its
        lease, so a process that dies meanwhile leaves it to lease recovery.
        """
        ...

    async def requeue(
        self,
        task_id: str,
        worker_id: str,
        attempt: int,
        *,
        delay_s: float,
        error: dict[str, Any] | None,
        refund_attempt: bool,
    ) -> TaskRecord | None:
        """Put a held task back in the queue, due ``delay_s`` from now on the store's clock (a
        retry, or a drain at shutdown); a task whose cancel was requested ends ``cancelled``
        instead. None when the claim is no longer this worker's."""
        ...

    async def heartbeat(
        self, worker_id: str, task_ids: Collection[str], lease_s: float
    ) -> list[str]:
        """Renew the leases of ``task_ids``, the tasks this worker really runs (a task it no
        longer runs is left to expire); the ids whose cancel was requested."""
        ...

    async def recover_expired(self) -> list[TaskRecord]:
        """Re-queue (attempts left) or fail with ``WorkerLost`` the tasks whose lease expired."""
        ...

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord: ...

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord: ...

    async def delete(self, task_id: str, *, owner: str | None) -> None: ...

    async def count_by_status(self, *, owner: str | None = None) -> dict[str, int]:
        """Tasks per status (every status present), of one tenant or (None) of all."""
        ...

    async def rate_used(self, name: str, rate: Rate) -> int:
        """How many tasks of type ``name`` started within the last ``rate.period_s``."""
        ...


class PublicationLedger(Protocol):
    """Which queued tasks have a broker message in flight (the Celery engine's bookkeeping).

    The store stays the truth: a message only names a task, and a task without a live message
    is found here and published again.
    """

    async def claim_one(
        self,
        task_id: str,
        *,
        name: str,
        worker_id: str,
        limit: int | None,
        lease_s: float,
        rate: Rate | None = None,
    ) -> TaskRecord | None:
        """Claim for the task a message names (the best queued task of its type); None when
        the message is to be dropped (its task finished, cancelled, running, or not yet due)."""
        ...

    async def due_for_publish(
        self,
        *,
        stale_s: float | None,
        limits: Mapping[str, int],
        n: int = 1000,
        rates: Mapping[str, Rate] | None = None,
    ) -> list[tuple[str, str, int]]:
        """``(id, name, priority)`` of queued, due tasks whose message must be sent (never sent
        since they became due, or with ``stale_s``, sent longer ago); marks them sent."""
        ...

    async def mark_unpublished(self, task_id: str) -> None:
        """Its message could not be sent: the next sweep sends it."""
        ...


class ScheduleStore(Protocol):
    """Periodic schedules and the record of their fires. ``fire`` records one planned fire and
    creates its task in one transaction, once, whatever the number of processes trying it."""

    async def now(self) -> float:
        """The clock fire times are judged by (the database's, where hosts share one)."""
        ...

    async def create(self, record: ScheduleRecord) -> ScheduleRecord: ...

    async def save(self, record: ScheduleRecord) -> ScheduleRecord: ...

    async def get(self, schedule_id: str, *, owner: str | None) -> ScheduleRecord: ...

    async def by_name(self, name: str, *, owner: str) -> ScheduleRecord | None: ...

    async def list_schedules(self, *, owner: str | None) -> list[ScheduleRecord]: ...

    async def delete(self, schedule_id: str, *, owner: str | None) -> None: ...

    async def due(self, now: float, limit: int = 100) -> list[ScheduleRecord]: ...

    async def next_due(self) -> float | None: ...

    async def fire(
        self,
        schedule: ScheduleRecord,
        fire_at: float,
        outcome: str,
        *,
        task: tuple[TaskRecord, str] | None,
        missed: list[float],
        next_fire_at: float | None,
        max_queued: int | None,
    ) -> tuple[str, TaskRecord | None] | None: ...

    async def fires(
        self, schedule_id: str, *, limit: int, before: float | None
    ) -> list[FireRecord]: ...


class BatchStore(Protocol):
    """Batches: many tasks of one type submitted together, each an ordinary task carrying the
    batch's id. Reading a batch's counts does not walk the table's other tasks."""

    async def create(
        self, batch: BatchRecord, tasks: NewTasks, *, max_queued: int | None
    ) -> BatchRecord:
        """Commit the batch and all its tasks in one transaction, or nothing (``QueueFull``;
        ``BatchExists`` when a batch of that id is committed already; whatever making a chunk
        of ``tasks`` raised). The batch's ``total`` is the number of tasks written."""
        ...

    async def get(self, batch_id: str, *, owner: str | None) -> BatchRecord: ...

    async def list_batches(
        self, *, owner: str | None, limit: int, before: float | None, name: str | None = None
    ) -> list[BatchRecord]:
        """Newest first, created before ``before`` (``name``: of that task type only)."""
        ...

    async def items(
        self,
        batch_id: str,
        *,
        owner: str | None,
        status: TaskStatus | None,
        after_seq: int | None,
        limit: int,
        only_error: str | None = None,
        except_error: str | None = None,
    ) -> list[TaskRecord]:
        """The batch's tasks in submission order, after ``after_seq``; only those whose error
        type is ``only_error``, or is not ``except_error`` (none is not)."""
        ...

    async def error_counts(self, batch_id: str) -> dict[tuple[str, str], int]:
        """The batch's items that carry an error, by ``(status, error type)``: a queued one
        waits for a retry after that error, a failed one ended with it."""
        ...

    async def cancel(self, batch_id: str, *, owner: str | None) -> tuple[int, list[str]]:
        """Cancel the queued items and request cancellation of the running ones: how many were
        cancelled, and the ids of the running ones asked to stop."""
        ...

    async def retry(
        self,
        batch_id: str,
        *,
        owner: str | None,
        statuses: Collection[TaskStatus],
        attempts: int,
        only_error: str | None = None,
        except_error: str | None = None,
    ) -> list[TaskRecord]:
        """Re-queue the items in ``statuses`` (terminal ones), each with ``attempts`` more;
        only those whose error type is ``only_error``, or is not ``except_error``."""
        ...

    async def hasten(
        self, batch_id: str, *, owner: str | None, error_type: str | None
    ) -> list[TaskRecord]:
        """Make due now the queued items waiting for a retry (after an error of type
        ``error_type``, or of any type)."""
        ...


class WorkerStore(Protocol):
    """The worker processes sharing this store, each renewing its row at its heartbeat."""

    async def beat(self, worker: WorkerRecord, *, lease_s: float) -> None:
        """Insert or renew the worker's row (its heartbeat time is the store's clock); rows of
        processes silent for ten leases are deleted."""
        ...

    async def gone(self, worker_id: str) -> None:
        """The worker stopped: its row is deleted."""
        ...

    async def alive(self, *, lease_s: float) -> list[WorkerRecord]:
        """Workers whose last heartbeat is within ``lease_s``, oldest first."""
        ...


class StatsReader(Protocol):
    async def snapshot(self, *, owner: str | None = None) -> Snapshot:
        """Task counts by type and status (``owner``'s, or all), and the oldest queued task's
        age."""
        ...

    async def add_totals(self, rows: Sequence[tuple[str, str, str, float]]) -> None:
        """Add a process's counts ``(metric, labels, le, n)`` to the totals (see ``tally``)."""
        ...

    async def totals(self) -> list[tuple[str, str, str, float]]:
        """Every series of every process's counts, summed."""
        ...

    async def prune(self, metric: str, before: str) -> None:
        """Forget ``metric``'s series whose ``le`` (a minute's start) is before ``before``."""
        ...

    async def since(self, metric: str, start: str) -> list[tuple[str, str, float]]:
        """``metric``'s series ``(labels, le, value)`` whose ``le`` is ``start`` or later."""
        ...


class LogStore(Protocol):
    async def append(self, task_id: str, lines: Sequence[LogLine]) -> None:
        """Add lines to the task's log, keeping its last ``MAX_LINES``."""
        ...

    async def read(self, task_id: str, *, after: int, limit: int) -> list[tuple[int, LogLine]]:
        """The task's lines after cursor ``after``, each with its cursor."""
        ...

    async def delete(self, task_id: str) -> None: ...


class RetentionStore(Protocol):
    async def purge(self, status: str, *, finished_before: float, limit: int) -> list[str]:
        """Delete up to ``limit`` tasks of the terminal ``status`` that finished before
        ``finished_before`` (epoch seconds), with their log lines, in one transaction: their
        ids."""
        ...
