"""What several routers answer with: the task as JSON, and strict JSON bodies."""

import json
import re
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import serialization
from ..errors import InvalidArguments
from ..record import SCHEDULE_KEY, reserved_key_problem
from ..serialization import NumberOnly
from ..status import TaskStatus
from ..task import MAX_DELAY_S, validated


class TaskLinks(BaseModel):
    self: str
    events: str
    result: str
    batch: str | None = None
    schedule: str | None = None


class TaskOut(BaseModel):
    """A task as the API shows it."""

    id: str
    name: str
    status: TaskStatus
    progress: float
    message: str | None
    args: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    attempts: int
    max_attempts: int
    priority: int
    timeout_s: float | None
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    run_at: str
    batch_id: str | None = None
    schedule_id: str | None = None
    links: TaskLinks


class SubmitOptions(BaseModel):
    """The options of a submission (``POST /tasks``, ``POST /batches``)."""

    model_config = ConfigDict(extra="forbid")

    # `"delay_s": false` or `"priority": "3"` is a client's mistake, not a value
    priority: Annotated[int | None, NumberOnly] = Field(
        default=None, ge=-1000, le=1000, description="Higher first."
    )
    delay_s: Annotated[float | None, NumberOnly] = Field(default=None, ge=0, le=MAX_DELAY_S)
    timeout_s: Annotated[float | None, NumberOnly] = Field(default=None, gt=0, le=MAX_DELAY_S)


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    try:
        content = orjson.dumps(body)
    except TypeError:  # integers past 64 bits, lone surrogates: valid JSON orjson will not write
        content = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        content,
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes, model: type[M]) -> M:
    """Strict JSON parsed and validated into ``model``; errors located under ``body``."""
    try:
        payload = serialization.loads(raw)
    except serialization.JSONError as exc:
        raise InvalidArguments(
            "the body is not valid JSON",
            details=[{"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}],
        ) from exc
    return validated(model, payload, location=("body",), message="invalid request body")


KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
_KEY = re.compile(KEY_PATTERN)
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "The same key (per tenant) answers what it first created, with 200. Keys starting "
        f"with `{SCHEDULE_KEY}` are the schedules' own (422)."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": KEY_PATTERN},
}


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header, checked (``422`` naming the header)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    problem = (
        f"Idempotency-Key must match {KEY_PATTERN} (1 to 200 characters)"
        if not _KEY.fullmatch(key)
        else reserved_key_problem(key)
    )
    if problem:
        raise InvalidArguments(
            "invalid Idempotency-Key",
            details=[
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": problem,
                    "type": "string_pattern_mismatch",
                }
            ],
        )
    return key
