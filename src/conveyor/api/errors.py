"""Conveyor's error tree mapped to HTTP responses, in one place."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import ConveyorError, QueueFull

ERROR_BODY: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "detail": {
                        "anyOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "object"}},
                        ]
                    }
                },
                "required": ["detail"],
            }
        }
    }
}


def error_response(exc: ConveyorError) -> JSONResponse:
    """The JSON response for a Conveyor error: ``{"detail": …}`` like FastAPI's own errors.

    Errors with field-level details answer FastAPI's validation shape (a list of
    ``{loc, msg, type}``), so clients handle one format for every ``422``.
    """
    detail: Any = exc.details if exc.details else exc.message
    if exc.details:
        detail = [{**item, "msg": item.get("msg") or exc.message} for item in exc.details]
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes a route can answer."""
    texts = {
        401: "Missing or invalid API key",
        404: "No such task (or schedule, or source)",
        409: "The task's state forbids this",
        413: "Request body too large",
        415: "Unsupported content type",
        422: "Invalid input (what was wrong, where)",
        429: "Too many queued tasks; see Retry-After",
        503: "The store is unavailable",
        507: "No room on the server's disk for the upload or the store",
    }
    return {code: {"description": texts[code], **ERROR_BODY} for code in codes}


async def conveyor_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """For your own routes: ``app.add_exception_handler(ConveyorError, conveyor_exception_handler)``
    turns Conveyor's errors (``TaskNotFound``, ``InvalidArguments``, …) into their 4xx answers."""
    assert isinstance(exc, ConveyorError)
    return error_response(exc)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTP error, with a ``405``'s ``Allow`` naming every method the
    path serves (Starlette names only those of the first route that matched the path).

    ``app.add_exception_handler(HTTPException, http_error_handler)``.
    """
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        scope = request.scope
        probe = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", "")}
        allowed = [
            method
            for method in _METHODS
            if any(
                route.matches({**probe, "method": method})[0] is Match.FULL
                for route in request.app.router.routes
            )
        ]
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)
