"""A JSON API for the ingestion tests, served by uvicorn on loopback: every pagination style,
rate limits and outages, and the bad answers a real API gives (HTML, truncated JSON, a gzip bomb,
a pagination loop, a redirect inside)."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Upstream:
    """What the API serves, and what it was asked."""

    records: list[dict[str, Any]] = field(default_factory=list)
    page_size: int = 10
    requests: list[str] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    failures_left: int = 0  # answers of 429/503 before the data
    gate_after: int = 0  # /gated serves this many pages, then holds each until `release`
    release: threading.Event = field(default_factory=threading.Event)
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_until(self, predicate: Callable[[list[str]], bool], timeout_s: float = 30) -> None:
        """Until ``predicate(requests)`` holds, woken by each request (no polling)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: predicate(list(self.requests)), timeout_s):
                raise AssertionError(f"the API was not asked as expected: {self.requests[-5:]}")

    def _record(self, request: str, headers: dict[str, str]) -> None:
        with self._arrived:
            self.requests.append(request)
            self.seen_headers.append(headers)
            self._arrived.notify_all()

    retry_after: str = "0"

    def fill(self, n: int, *, version: int = 1) -> None:
        self.records = [
            {
                "id": i,
                "name": f"item {i}",
                "price": i * 1.5,
                "active": i % 2 == 0,
                "tags": ["a", "b"],
                "updated_at": (START + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "version": version,
            }
            for i in range(1, n + 1)
        ]


def build_api(upstream: Upstream) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Response:
        upstream._record(f"{request.url.path}?{request.url.query}", dict(request.headers))
        if upstream.failures_left > 0 and request.url.path.startswith("/flaky"):
            upstream.failures_left -= 1
            status = 429 if upstream.failures_left % 2 == 0 else 503
            return Response(status_code=status, headers={"Retry-After": upstream.retry_after})
        response: Response = await call_next(request)
        return response

    @app.get("/pages")
    async def pages(page: int = 1) -> Any:
        return {"data": {"items": _page(upstream, page)}}

    @app.get("/flaky/pages")
    async def flaky(page: int = 1) -> Any:
        return {"data": {"items": _page(upstream, page)}}

    @app.get("/offset")
    async def offset(offset: int = 0, limit: int = 10) -> Any:
        return upstream.records[offset : offset + limit]

    @app.get("/cursor")
    async def cursor(cursor: int = 0) -> Any:
        chunk = upstream.records[cursor : cursor + upstream.page_size]
        following = cursor + len(chunk)
        return {"items": chunk, "meta": {"next": following if chunk else None}}

    @app.get("/link")
    async def link(request: Request, page: int = 1) -> Any:
        chunk = _page(upstream, page)
        headers = {}
        if chunk:
            headers["Link"] = f'<{request.url.path}?page={page + 1}>; rel="next"'
        return JSONResponse(chunk, headers=headers)

    @app.get("/next")
    async def next_url(page: int = 1) -> Any:
        chunk = _page(upstream, page)
        return {"results": chunk, "next": f"/next?page={page + 1}" if chunk else None}

    @app.get("/since")
    async def since(updated_since: str | None = None) -> Any:
        return [r for r in upstream.records if r["updated_at"] >= (updated_since or "")]

    @app.get("/gated")
    async def gated(page: int = 1) -> Any:
        if page > upstream.gate_after:
            await anyio.to_thread.run_sync(upstream.release.wait)
        return _page(upstream, page)

    @app.get("/loop")
    async def loop() -> Any:
        return {"results": upstream.records[:2], "next": "/loop"}

    @app.get("/html")
    async def html() -> Response:
        return Response("<html><body>Maintenance</body></html>", media_type="text/html")

    @app.get("/truncated")
    async def truncated() -> Response:
        return Response(b'[{"id": 1, "name": "cut', media_type="application/json")

    @app.get("/bomb")
    async def bomb() -> Response:
        body = gzip.compress(b"[" + b" " * 20_000_000 + b"]", compresslevel=9)
        return Response(body, media_type="application/json", headers={"Content-Encoding": "gzip"})

    @app.get("/slow")
    async def slow() -> Any:
        """No answer until the test releases it (the client's timeout comes first)."""
        await anyio.to_thread.run_sync(upstream.release.wait)
        return []

    @app.get("/inside")
    async def inside(request: Request) -> Response:
        port = request.url.port
        return RedirectResponse(f"http://127.0.0.2:{port}/pages")

    @app.get("/wait-long")
    async def wait_long() -> Response:
        moment = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 7200))
        return Response(status_code=429, headers={"Retry-After": moment})

    return app


def _page(upstream: Upstream, number: int) -> list[dict[str, Any]]:
    start = (number - 1) * upstream.page_size
    return upstream.records[start : start + upstream.page_size]
