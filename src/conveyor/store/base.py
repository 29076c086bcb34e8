"""The contract every store implements (SQLite now; PostgreSQL beside it later)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from ..record import TaskRecord
from ..status import TaskStatus


class Store(Protocol):
    """Durable task records, and the queue operations on them.

    ``owner=None`` means "any tenant" (used by engines); the API always passes the caller's tenant.
    Every write that finishes an attempt is guarded by the claim token ``(worker_id, attempt)``:
    a stale worker's write is dropped, so each attempt is recorded at most once.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(task_id)`` when another process changes a task (``""``: changes may
        have been missed). Stores without change notifications never call it; waiters poll."""
        ...

    async def insert(
        self, record: TaskRecord, *, args_json: str, max_queued: int | None
    ) -> tuple[TaskRecord, bool]:
        """Commit a new task (``args_json``: its arguments as strict JSON); with an idempotency
        key already used, the existing task and False."""
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
    ) -> list[TaskRecord]: ...

    async def claim(
        self,
        *,
        worker_id: str,
        names: Collection[str],
        limits: Mapping[str, int],
        n: int,
        lease_s: float,
    ) -> list[TaskRecord]:
        """Move up to ``n`` due queued tasks to ``running`` under a lease, best priority first,
        respecting per-type ``limits`` across every worker sharing the store."""
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
        """Record the outcome of an attempt; False when the claim is no longer this worker's."""
        ...

    async def requeue(
        self,
        task_id: str,
        worker_id: str,
        attempt: int,
        *,
        run_at: float,
        error: dict[str, Any] | None,
        refund_attempt: bool,
    ) -> TaskRecord | None:
        """Put a running task back in the queue (a retry, or a drain at shutdown)."""
        ...

    async def heartbeat(self, worker_id: str, lease_s: float) -> list[str]:
        """Renew the leases of this worker's running tasks; the ids whose cancel was requested."""
        ...

    async def recover_expired(self) -> list[TaskRecord]:
        """Re-queue (attempts left) or fail with ``WorkerLost`` the tasks whose lease expired."""
        ...

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord: ...

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord: ...

    async def delete(self, task_id: str, *, owner: str | None) -> None: ...

    async def count_by_status(self) -> dict[str, int]: ...
