"""Request handling shared by every Conveyor route: strict JSON, body limits, error mapping."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConveyorError
from .errors import error_response

MAX_BODY_SCOPE_KEY = "conveyor.max_body_bytes"
BASE_SCOPE_KEY = "conveyor.links_base"


class StrictRequest(Request):
    """A request whose body is capped while it streams in (413)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            limit: int = self.scope.get(MAX_BODY_SCOPE_KEY, 1_048_576)
            declared = self.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:  # the ASGI messages directly: Request.stream()'s generator costs more
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            self._body = b"".join(chunks)
        return self._body


RawEndpoint = Callable[[Request], Coroutine[Any, Any, Response]]


def raw_endpoint(endpoint: RawEndpoint) -> RawEndpoint:
    """Mark an ``async def f(request) -> Response`` endpoint to be called directly, without
    FastAPI's parameter solving (its OpenAPI entry is still generated from the decorator)."""
    endpoint.__conveyor_raw__ = True  # type: ignore[attr-defined]
    return endpoint


def strict_route_class(max_body_bytes: int, *, prefix: str = "") -> type[APIRoute]:
    """An ``APIRoute`` class applying the body limit, mapping ``ConveyorError`` to HTTP and
    telling its endpoint where the API is served (:func:`links_base`); ``prefix`` is the one
    given to ``yard.router()``, the start of the routes' paths that is not their own."""

    class ConveyorRoute(APIRoute):
        def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
            # How many segments of a request's path are this route's own: counted once, where
            # it is declared (a FastAPI that copies routes on inclusion copies the endpoint)
            own = endpoint.__dict__.setdefault(
                "__conveyor_depth__", path.removeprefix(prefix).count("/")
            )
            self.own_segments: int = own
            super().__init__(path, endpoint, **kwargs)
            if getattr(endpoint, "__conveyor_raw__", False):
                self.app = _lean_app(endpoint, max_body_bytes, own)

        def get_route_handler(self) -> RawEndpoint:
            handler: RawEndpoint = (
                self.endpoint
                if getattr(self.endpoint, "__conveyor_raw__", False)
                else super().get_route_handler()
            )
            own = self.own_segments

            async def handle(request: Request) -> Response:
                scope = _stamped(request.scope, max_body_bytes, own)
                strict = StrictRequest(scope, request.receive)
                try:
                    return await handler(strict)
                except ConveyorError as exc:
                    return error_response(exc)

            return handle

    return ConveyorRoute


def _stamped(scope: Scope, max_body_bytes: int, own_segments: int) -> Scope:
    """``scope`` with what a Conveyor endpoint reads from it: its body cap and its links' base
    (the request's path less the route's own segments)."""
    scope[MAX_BODY_SCOPE_KEY] = max_body_bytes
    scope[BASE_SCOPE_KEY] = scope["path"].rsplit("/", own_segments)[0]
    return scope


def _lean_app(endpoint: RawEndpoint, max_body_bytes: int, own_segments: int) -> ASGIApp:
    """A raw endpoint as an ASGI app, without what FastAPI's ``request_response`` adds for
    other endpoints: its two exit stacks serve dependencies (a raw endpoint has none) and its
    exception wrapper repeats the app's ``ExceptionMiddleware``, which answers whatever the
    endpoint raises with the same handlers. Middleware and exception handlers apply as to any
    route; measured on ``POST /tasks``: +10 % requests/s API only, +24 % with workers in the
    process (``benchmarks/README.md``). A router included with options is served through
    FastAPI's own path, which gives the same answers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        _stamped(scope, max_body_bytes, own_segments)
        try:
            response = await endpoint(StrictRequest(scope, receive, send))
        except ConveyorError as exc:
            response = error_response(exc)
        await response(scope, receive, send)

    return app


def links_base(request: Request) -> str:
    """Where the API is served, for the links and ``Location`` headers it answers: the request's
    path less the route's own segments, so a mount, a proxy's ``root_path``, a prefix given to
    ``yard.router()`` or to ``include_router`` are all in it ("" at the root)."""
    base: str = request.scope.get(BASE_SCOPE_KEY, "")
    return base


Base = Annotated[str, Depends(links_base)]
"""An endpoint's parameter: :func:`links_base` of its request."""


def adopt_routes(parent: APIRouter | FastAPI, child: APIRouter) -> None:
    """``child``'s routes as ``parent``'s own, for a router included without options.
    ``include_router`` keeps a router as a node each request is matched through (FastAPI 0.165
    walks the tree's routes for changes on every match); a route is finished when declared (its
    prefix, route class and responses applied), so the parent matches it directly: measured
    +17 % requests/s on ``POST /tasks`` (``benchmarks/README.md``). The parent's own
    router-level options are not applied to the adopted routes (the app has none)."""
    routes = parent.router.routes if isinstance(parent, FastAPI) else parent.routes
    routes.extend(child.routes)
