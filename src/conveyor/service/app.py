"""The ready service: Conveyor's API with the built-in task types, as a FastAPI app."""

from __future__ import annotations

import importlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api.errors import http_error_handler
from ..core import Conveyor
from ..settings import Settings
from .demo import register_demo_tasks

logger = logging.getLogger("conveyor.service")


def build_yard(settings: Settings, *, run_workers: bool = True) -> Conveyor:
    """A Conveyor instance with every built-in task type registered."""
    yard = Conveyor(settings, run_workers=run_workers)
    register_demo_tasks(yard)
    if _available("PIL", "conveyor[images]", "the image service"):
        from .images import register_image_tasks

        register_image_tasks(yard)
    if _available("duckdb", "conveyor[csv]", "the CSV statistics service"):
        from .csvstats import register_csv_tasks

        register_csv_tasks(yard)
    return yard


def _available(module: str, extra: str, service: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        logger.warning("%s is off: pip install '%s'", service, extra)
        return False
    return True


def create_app(
    settings: Settings | None = None, *, yard: Conveyor | None = None, run_workers: bool = True
) -> FastAPI:
    """The service app: ``/tasks`` API, health, OpenAPI docs; workers run inside it."""
    if yard is None:
        yard = build_yard(settings or Settings(), run_workers=run_workers)
    app = FastAPI(
        title="Conveyor",
        version=__version__,
        description="Durable background tasks: submit, follow progress, fetch results.",
        lifespan=yard.lifespan,
    )
    app.state.yard = yard
    app.include_router(yard.router())
    if "images.transform" in yard.task_types:
        from .images import build_image_router

        app.include_router(build_image_router(yard))
    if "csv.stats" in yard.task_types:
        from .csvstats import build_csv_router

        app.include_router(build_csv_router(yard))

    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/docs")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
