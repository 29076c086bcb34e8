"""What every SQL store shares: the task columns, in order, and a row's record."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..record import TaskRecord, schedule_keys
from ..schedule_record import ScheduleRecord
from ..status import TaskStatus

COLUMNS = (
    "seq, id, name, owner, status, priority, args, result, error, progress, message, attempts, "
    "max_attempts, timeout_s, created_at, started_at, finished_at, run_at, idempotency_key, "
    "cancel_requested, worker_id, lease_expires_at, result_blob, batch_id"
)

SCHEDULE_FIELDS = (
    "id, owner, name, task, args, cron, every_s, timezone, start_at, end_at, jitter_s, misfire, "
    "max_lateness_s, overlap, enabled, from_code, next_fire_at, last_task_id, created_at, "
    "updated_at"
)
SCHEDULE_COLUMNS = SCHEDULE_FIELDS.split(", ")
SCHEDULE_MUTABLE = [c for c in SCHEDULE_COLUMNS if c not in ("id", "owner", "created_at")]

WORKER_LOST = {
    "type": "WorkerLost",
    "message": "the worker running this task stopped renewing its lease",
    "traceback": None,
}


def record_from_row(row: Sequence[Any]) -> TaskRecord:
    """The record of a row selected as ``COLUMNS`` (JSON columns are text)."""
    return TaskRecord(
        seq=row[0],
        id=row[1],
        name=row[2],
        owner=row[3],
        status=TaskStatus(row[4]),
        priority=row[5],
        args=json.loads(row[6]),
        result=None if row[7] is None else json.loads(row[7]),
        error=None if row[8] is None else json.loads(row[8]),
        progress=row[9],
        message=row[10],
        attempts=row[11],
        max_attempts=row[12],
        timeout_s=row[13],
        created_at=row[14],
        started_at=row[15],
        finished_at=row[16],
        run_at=row[17],
        idempotency_key=row[18],
        cancel_requested=bool(row[19]),
        worker_id=row[20],
        lease_expires_at=row[21],
        result_blob=None if row[22] is None else json.loads(row[22]),
        batch_id=row[23],
    )


def dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What a listing narrows to beyond owner, status and type (None: not narrowed): a batch,
    a schedule (the tasks its fires made: read by their idempotency keys, with the schedule's
    owner given), an id prefix (at least 8 characters: a UUIDv7's first 8 are its first 65
    seconds), and a time range of submission (epoch seconds, from inclusive, to exclusive)."""

    batch_id: str | None = None
    schedule_id: str | None = None
    id_prefix: str | None = None
    created_after: float | None = None
    created_before: float | None = None

    @property
    def times(self) -> bool:
        return self.created_after is not None or self.created_before is not None


NO_FILTER = TaskFilter()
MIN_ID_PREFIX = 8


async def seq_from(
    moment: float,
    bounds: tuple[int | None, int | None],
    probe: Callable[[int], Awaitable[tuple[int, float] | None]],
) -> int:
    """The first ``seq`` whose task was submitted at ``moment`` or later, found by bisection
    over ``seq`` (tasks are numbered in submission order), ``probe(s)`` giving the first task
    at or after ``s``: a few dozen point reads whatever the history's length. A clock that
    stepped back makes the bound approximate by that step."""
    low, high = bounds
    if low is None or high is None:
        return 0
    high += 1  # one past the last: no task at or after the moment
    while low < high:
        middle = (low + high) // 2
        found = await probe(middle)
        if found is None or found[1] >= moment:
            high = middle
        else:
            low = found[0] + 1
    return low


async def seq_range(
    narrowed: TaskFilter,
    table: str,
    fetch: Callable[[str, int | None], Awaitable[Sequence[Any] | None]],
    placeholder: str,
) -> tuple[int | None, int | None]:
    """The ``seq`` bounds of ``narrowed``'s time range; ``fetch(sql, param)`` reads one row."""
    if not narrowed.times:
        return None, None
    first_last = await fetch(  # one aggregate per query: each is read off the key's ends
        f"SELECT (SELECT min(seq) FROM {table}), (SELECT max(seq) FROM {table})", None
    )
    bounds = (None, None) if first_last is None else (first_last[0], first_last[1])
    statement = (
        f"SELECT seq, created_at FROM {table} WHERE seq >= {placeholder} ORDER BY seq LIMIT 1"
    )

    async def probe(seq: int) -> tuple[int, float] | None:
        found = await fetch(statement, seq)
        return None if found is None else (found[0], found[1])

    after, before = narrowed.created_after, narrowed.created_before
    return (
        None if after is None else await seq_from(after, bounds, probe),
        None if before is None else await seq_from(before, bounds, probe),
    )


def list_query(
    table: str,
    placeholder: Callable[[int], str],
    *,
    owner: str | None,
    status: TaskStatus | None,
    name: str | None,
    limit: int,
    before_seq: int | None,
    narrowed: TaskFilter = NO_FILTER,
    seq_range: tuple[int | None, int | None] = (None, None),
    by_id: str = "",
    by_key: str = "",
) -> tuple[str, list[Any]]:
    """The newest-first page query of ``list_tasks``; ``placeholder(n)`` is the n-th parameter
    in the driver's style (``?`` or ``$n``). ``seq_range`` bounds a time range by submission
    order (see :func:`seq_from`), so a page reads only the rows inside it. An id prefix is read
    through the id's index (``by_id``: how to ask for it, where the planner needs telling), and
    the ids sharing it are sorted: with 8 characters of a UUIDv7, those of 65 seconds. A
    schedule's tasks are read through the ``(owner, idempotency_key)`` index (``by_key``) and
    sorted: the cost grows with that schedule's kept tasks, not with the history."""
    where: list[str] = []
    params: list[Any] = []

    def add(condition: str, value: Any) -> None:
        params.append(value)
        where.append(condition.format(placeholder(len(params))))

    for column, value in (
        ("owner", owner),
        ("status", status),
        ("name", name),
        ("batch_id", narrowed.batch_id),
    ):
        if value is not None:
            add(f"{column} = {{}}", str(value))
    if narrowed.schedule_id is not None:
        low, high = schedule_keys(narrowed.schedule_id)
        add("idempotency_key >= {}", low)
        add("idempotency_key < {}", high)
    if narrowed.id_prefix is not None:
        prefix = narrowed.id_prefix
        add("id >= {}", prefix)
        add("id < {}", prefix[:-1] + chr(ord(prefix[-1]) + 1))
    if narrowed.created_after is not None:
        add("created_at >= {}", narrowed.created_after)
    if narrowed.created_before is not None:
        add("created_at < {}", narrowed.created_before)
    first, last = seq_range
    if first is not None:
        add("seq >= {}", first)
    if last is not None:
        before_seq = last if before_seq is None else min(before_seq, last)
    if before_seq is not None:
        params.append(before_seq)
        where.append(f"seq < {placeholder(len(params))}")
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    params.append(limit)
    page = f"ORDER BY seq DESC LIMIT {placeholder(len(params))}"
    source = table
    if narrowed.schedule_id is not None and by_key:
        source = f"{table} {by_key}"
    elif narrowed.id_prefix is not None and by_id:
        source = f"{table} {by_id}"
    return f"SELECT {COLUMNS} FROM {source} {clause} {page}", params


def choose_claims(candidates: Sequence[tuple[str, str]], room: dict[str, int], n: int) -> list[str]:
    """Up to ``n`` ids from ``(id, name)`` candidates in queue order, skipping types with no
    ``room`` left under their concurrency limit (``room`` is consumed)."""
    chosen: list[str] = []
    for task_id, name in candidates:
        if name in room:
            if room[name] <= 0:
                continue
            room[name] -= 1
        chosen.append(task_id)
        if len(chosen) == n:
            break
    return chosen


def recovery_statements(table: str, *, now: str, lost: str) -> tuple[str, str, str]:
    """Lease recovery, one portable statement per outcome, each returning the changed rows:
    a task whose cancel was requested ends ``cancelled``; one with attempts left goes back to
    the queue; the rest fail with ``WorkerLost``. ``now`` is the SQL for the current time, and
    ``lost`` the parameter carrying ``WORKER_LOST`` (the first statement does not use it). Each
    statement reads the clock anew, so a lease can expire between two of them: each statement
    takes only its own kind (a cancel requested; attempts left; none left), and a task whose
    lease ran out after its statement ran is taken by the next recovery."""
    expired = f"status = 'running' AND lease_expires_at < {now}"
    return (
        f"UPDATE {table} SET status = 'cancelled', finished_at = {now}, "
        f"lease_expires_at = NULL WHERE {expired} AND cancel_requested RETURNING {COLUMNS}",
        f"UPDATE {table} SET status = 'queued', run_at = {now}, error = {lost}, "
        f"worker_id = NULL, lease_expires_at = NULL WHERE {expired} AND NOT cancel_requested "
        f"AND attempts < max_attempts RETURNING {COLUMNS}",
        f"UPDATE {table} SET status = 'failed', error = {lost}, finished_at = {now}, "
        f"lease_expires_at = NULL WHERE {expired} AND NOT cancel_requested "
        f"AND attempts >= max_attempts RETURNING {COLUMNS}",
    )


def retry_set(attempts: str, now: str) -> str:
    """The SET list that puts a terminal task back in the queue with ``attempts`` more
    attempts (an explicit retry), due at ``now``: its outcome and claim cleared."""
    return (
        f"status = 'queued', max_attempts = attempts + {attempts}, run_at = {now}, "
        "result = NULL, result_blob = NULL, error = NULL, progress = 0, message = NULL, "
        "started_at = NULL, finished_at = NULL, cancel_requested = FALSE, worker_id = NULL"
    )


def requeue_statement(table: str, *, param: Callable[[int], str], now: str, held: str) -> str:
    """Put a held task back in the queue (a retry, or a drain at shutdown), one portable
    statement: parameters 1-3 are the delay (seconds, on the store's clock), the error and the
    attempt refund (0 or 1); ``held`` is the claim-token condition. A task whose cancel was
    requested ends ``cancelled`` instead: a cancel request wins over a retry and a drain."""
    delay, error, refund = param(1), param(2), param(3)
    return (
        f"UPDATE {table} SET "
        "status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, "
        f"finished_at = CASE WHEN cancel_requested THEN {now} END, "
        f"run_at = {now} + {delay}, "
        f"error = CASE WHEN cancel_requested THEN NULL ELSE {error} END, "
        f"worker_id = NULL, lease_expires_at = NULL, attempts = attempts - {refund} "
        f"WHERE {held} RETURNING {COLUMNS}"
    )


def schedule_row(record: ScheduleRecord) -> list[Any]:
    """A schedule's values in ``SCHEDULE_COLUMNS`` order (its arguments as JSON text)."""
    values = {c: getattr(record, c) for c in SCHEDULE_COLUMNS}
    values["args"] = json.dumps(record.args, separators=(",", ":"))
    return [values[c] for c in SCHEDULE_COLUMNS]


def schedule_from_row(row: Sequence[Any]) -> ScheduleRecord:
    """The schedule of a row selected as ``SCHEDULE_FIELDS``."""
    values = dict(zip(SCHEDULE_COLUMNS, row, strict=True))
    values["args"] = json.loads(values["args"])
    values["enabled"] = bool(values["enabled"])
    values["from_code"] = bool(values["from_code"])
    return ScheduleRecord(**values)
