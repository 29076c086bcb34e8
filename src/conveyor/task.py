"""Task types: a function, its validated argument model, and its options."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import (
    Annotated,
    Any,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from . import serialization
from .batch_record import CHUNK, BatchRecord, NewTasks
from .context import TaskContext
from .errors import InvalidArguments, TaskTypeError
from .handle import TaskAccess, TaskHandle
from .ids import uuid7, uuid7_many
from .rates import Rate
from .record import TaskRecord
from .serialization import NumberOnly
from .status import TaskStatus

P = ParamSpec("P")
R = TypeVar("R")

Executor = Literal["async", "thread", "process"]
MAX_DELAY_S = 366 * 24 * 3600.0  # the longest delay (and timeout) a submission may ask for


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Tells "use the default" apart from ``None`` ("no limit")."""


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options of a task type. ``timeout_s=None`` means no limit."""

    timeout_s: float | None = None
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff_base_s: float | None = None
    concurrency: int | None = None
    rate: Rate | None = None
    priority: int = 0
    executor: Executor = "async"
    idempotent: bool = False
    public: bool = True

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "retry_on": [exc.__name__ for exc in self.retry_on],
            "concurrency": self.concurrency,
            "rate": None if self.rate is None else str(self.rate),
            "priority": self.priority,
            "executor": self.executor,
            "idempotent": self.idempotent,
            "public": self.public,
        }


def _exact_numbers(hint: Any) -> Any:
    """``hint``, made to refuse booleans and strings when it is a plain ``int`` or ``float``
    (possibly ``Annotated`` with constraints)."""
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    return Annotated[hint, NumberOnly] if base in (int, float) else hint


def validation_details(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    """pydantic errors as ``{loc, msg, type}`` dicts, located under ``prefix``."""
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], payload: Any, *, location: tuple[str | int, ...], message: str) -> M:
    """``payload`` validated into ``model``, or ``InvalidArguments`` locating each error."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidArguments(message, details=validation_details(exc, location)) from exc


class Submitter(TaskAccess, Protocol):
    """What a task type needs to submit runs of itself (``Conveyor`` is one)."""

    async def submit_validated(
        self,
        task_type: TaskType[Any, Any],
        args: dict[str, Any],
        *,
        owner: str,
        priority: int | None,
        delay_s: float | None,
        timeout_s: float | None,
        idempotency_key: str | None,
        task_id: str | None = None,
    ) -> tuple[TaskRecord, bool]: ...

    async def batch(
        self, name: str, items: Sequence[Mapping[str, Any]], *, owner: str = ""
    ) -> BatchRecord: ...


class TaskType(Generic[P, R]):
    """A registered task function. Submit runs of it with ``await task.submit(...)``."""

    def __init__(
        self, fn: Callable[..., Any], *, name: str, options: TaskOptions, submitter: Submitter
    ) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self._submitter = submitter
        self.module = fn.__module__
        self.qualname = fn.__qualname__
        self.takes_context, self.args_model = _argument_model(fn, name)
        self._fields = tuple(self.args_model.model_fields)
        if options.executor == "process" and "<locals>" in self.qualname:
            raise TaskTypeError(
                f"task {name!r}: executor='process' needs a module-level function "
                "(child processes import it by name)"
            )

    def __repr__(self) -> str:
        return f"<TaskType {self.name} executor={self.options.executor}>"

    def validate(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Validate keyword arguments; their JSON form, or :class:`InvalidArguments`."""
        model = validated(
            self.args_model,
            args,
            location=("args",),
            message=f"invalid arguments for {self.name!r}",
        )
        return model.model_dump(mode="json")

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Validate a Python call's arguments; their JSON form."""
        if len(args) > len(self._fields):
            raise InvalidArguments(
                f"task {self.name!r} takes {len(self._fields)} arguments, got {len(args)}"
            )
        merged = dict(zip(self._fields, args, strict=False))
        for key, value in kwargs.items():
            if key in merged:
                raise InvalidArguments(f"task {self.name!r} got two values for {key!r}")
            merged[key] = value
        return self.validate(merged)

    def call_kwargs(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Stored JSON arguments as the typed values the function receives."""
        model = self.args_model.model_validate(stored)
        return {field: getattr(model, field) for field in self._fields}

    def argument_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Validate the arguments, commit the task, and return its handle."""
        return await self.options_for().submit(*args, **kwargs)

    async def batch(self, items: Sequence[Mapping[str, Any]], *, owner: str = "") -> BatchRecord:
        """Submit one run per item of keyword arguments as one batch (one transaction);
        ``yard.batches`` follows it."""
        return await self._submitter.batch(self.name, items, owner=owner)

    def options_for(
        self,
        *,
        priority: int | None = None,
        delay_s: float | None = None,
        timeout_s: float | None = UNSET,
        idempotency_key: str | None = None,
        owner: str = "",
    ) -> Submission[P, R]:
        """Per-submission options; ``await task.options_for(priority=9).submit(...)``."""
        return Submission(self, priority, delay_s, timeout_s, idempotency_key, owner)


class Submission(Generic[P, R]):
    """A task type with per-submission options bound."""

    def __init__(
        self,
        task_type: TaskType[P, R],
        priority: int | None,
        delay_s: float | None,
        timeout_s: float | None,
        idempotency_key: str | None,
        owner: str,
    ) -> None:
        self._type = task_type
        self._priority = priority
        self._delay_s = delay_s
        self._timeout_s = timeout_s
        self._idempotency_key = idempotency_key
        self._owner = owner

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        submitter = self._type._submitter
        record, _ = await submitter.submit_validated(
            self._type,
            self._type.bind(*args, **kwargs),
            owner=self._owner,
            priority=self._priority,
            delay_s=self._delay_s,
            timeout_s=self._timeout_s,
            idempotency_key=self._idempotency_key,
        )
        return TaskHandle(record.id, submitter, owner=self._owner)


def _argument_model(fn: Callable[..., Any], name: str) -> tuple[bool, type[BaseModel]]:
    try:
        signature = inspect.signature(fn)
        hints = get_type_hints(fn, include_extras=True)
    except (TypeError, ValueError, NameError) as exc:
        raise TaskTypeError(f"task {name!r}: cannot read the signature: {exc}") from exc
    params = list(signature.parameters.values())
    takes_context = bool(params) and (
        hints.get(params[0].name) is TaskContext or params[0].name == "ctx"
    )
    fields: dict[str, Any] = {}
    for param in params[1 if takes_context else 0 :]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TaskTypeError(
                f"task {name!r}: parameter {param.name!r} must be a named parameter "
                "(no *args, **kwargs or positional-only)"
            )
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (_exact_numbers(hints.get(param.name, Any)), default)
    model_name = "".join(part.title() for part in name.replace("-", "_").split(".")) + "Args"
    config = ConfigDict(extra="forbid", allow_inf_nan=False, title=f"{name} arguments")
    try:
        model = create_model(model_name, __config__=config, **fields)
    except Exception as exc:
        raise TaskTypeError(f"task {name!r}: unsupported argument types: {exc}") from exc
    return takes_context, model


def new_records(
    task_type: TaskType[Any, Any],
    items: Sequence[Mapping[str, Any]],
    *,
    owner: str,
    priority: int | None,
    delay_s: float | None,
    timeout_s: float | None,
    task_ids: Sequence[str] | None = None,
) -> list[tuple[TaskRecord, str]]:
    """New tasks' records and their arguments as JSON, one per item of arguments (an
    invalid item raises ``InvalidArguments`` locating it under ``items``)."""
    if task_ids is not None and len(task_ids) != len(items):
        raise InvalidArguments("task_ids must name one id per item")
    built = []
    for index, item in enumerate(items):
        args, args_json = _item(task_type, item, index, checked=False)
        built.append(
            new_record(
                task_type,
                args,
                owner=owner,
                priority=priority,
                delay_s=delay_s,
                timeout_s=timeout_s,
                idempotency_key=None,
                task_id=None if task_ids is None else task_ids[index],
                args_json=args_json,
            )
        )
    return built


def new_record(
    task_type: TaskType[Any, Any],
    args: dict[str, Any],
    *,
    owner: str,
    priority: int | None,
    delay_s: float | None,
    timeout_s: float | None,
    idempotency_key: str | None,
    task_id: str | None,
    batch_id: str | None = None,
    args_json: str | None = None,
) -> tuple[TaskRecord, str]:
    """A new task's record and its arguments as JSON (``args_json`` if given), its options
    checked."""
    priority, timeout_s, now, run_at = _options(task_type, priority, delay_s, timeout_s)
    record = TaskRecord(
        id=task_id or uuid7(),
        name=task_type.name,
        status=TaskStatus.QUEUED,
        args=args,
        owner=owner,
        priority=priority,
        max_attempts=task_type.options.max_attempts,
        timeout_s=timeout_s,
        created_at=now,
        run_at=run_at,
        idempotency_key=idempotency_key,
        batch_id=batch_id,
    )
    return record, _args_json(task_type, args) if args_json is None else args_json


def new_tasks(
    task_type: TaskType[Any, Any],
    items: Iterable[Mapping[str, Any]],
    *,
    owner: str,
    priority: int | None,
    delay_s: float | None,
    timeout_s: float | None,
    batch_id: str,
    checked: bool = False,
) -> NewTasks:
    """A new batch's tasks, one per item of arguments, their options checked now and their items
    as the chunks are made (an invalid item raises ``InvalidArguments`` locating it under
    ``items``). ``checked``: the items are complete arguments Conveyor built itself from checked
    input (a service's own batch), taken as they are and written with orjson (measured:
    validating 100,000 of them again cost a second)."""
    priority, timeout_s, now, run_at = _options(task_type, priority, delay_s, timeout_s)

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        given = iter(items)
        done = 0
        while part := list(islice(given, CHUNK)):
            args_json = [
                _item(task_type, item, index, checked=checked)[1]
                for index, item in enumerate(part, done)
            ]
            done += len(part)
            yield uuid7_many(len(part)), args_json

    return NewTasks(
        name=task_type.name,
        owner=owner,
        priority=priority,
        max_attempts=task_type.options.max_attempts,
        timeout_s=timeout_s,
        created_at=now,
        run_at=run_at,
        batch_id=batch_id,
        chunks=chunks(),
    )


def _options(
    task_type: TaskType[Any, Any],
    priority: int | None,
    delay_s: float | None,
    timeout_s: float | None,
) -> tuple[int, float | None, float, float]:
    """A new task's priority, timeout, creation time and due time, checked."""
    if delay_s is not None and not (0 <= delay_s <= MAX_DELAY_S and math.isfinite(delay_s)):
        raise InvalidArguments(f"delay_s must be between 0 and {MAX_DELAY_S:.0f}")
    if timeout_s is UNSET:
        timeout_s = task_type.options.timeout_s
    elif timeout_s is not None and not (0 < timeout_s < math.inf):
        raise InvalidArguments("timeout_s must be a positive number")
    now = time.time()
    priority = task_type.options.priority if priority is None else priority
    return priority, timeout_s, now, now + (delay_s or 0.0)


def _item(
    task_type: TaskType[Any, Any], item: Mapping[str, Any], index: int, *, checked: bool
) -> tuple[dict[str, Any], str]:
    """One item's arguments and their JSON; ``checked``: taken as they are (not copied)."""
    if checked:
        args = item if isinstance(item, dict) else dict(item)
        text = _fast_json(args)
    else:
        try:
            args, text = task_type.validate(item), None
        except InvalidArguments as exc:
            exc.details = [{**d, "loc": ["items", index, *d["loc"]]} for d in exc.details]
            raise
    return args, _args_json(task_type, args) if text is None else text


def _args_json(task_type: TaskType[Any, Any], args: dict[str, Any]) -> str:
    try:
        return serialization.dumps(args)
    except serialization.JSONError as exc:
        raise InvalidArguments(f"arguments of task {task_type.name!r} are {exc}") from exc


def _fast_json(args: dict[str, Any]) -> str | None:
    """orjson's text for checked arguments; None (the strict writer then) for what orjson will
    not write: integers past 64 bits, lone surrogates."""
    try:
        return orjson.dumps(args).decode()
    except TypeError:
        return None
