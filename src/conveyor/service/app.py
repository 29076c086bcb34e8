"""The ready service: Conveyor's API with the built-in task types, as a FastAPI app."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api.auth import tenant_resolver
from ..api.errors import http_error_handler
from ..api.router import anonymous_openapi
from ..api.routing import adopt_routes
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
    if _available("sqlalchemy", "conveyor[ingest]", "the ingestion service"):
        from .ingest import register_ingest_tasks
        from .ingest_pages import ingest_section

        yard.dashboard_sections.append(ingest_section(register_ingest_tasks(yard)))
    if all(
        _available(module, "conveyor[email]", "the email service")
        for module in ("aiosmtplib", "email_validator", "jinja2")
    ):
        from .email import register_email_tasks
        from .email_pages import email_section

        yard.dashboard_sections.append(email_section(register_email_tasks(yard)))
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
    keyed = bool(yard.settings.tenants_by_key())
    app = FastAPI(
        title="Conveyor",
        version=__version__,
        description="Durable background tasks: submit, follow progress, fetch results.",
        lifespan=yard.lifespan,
        # with API keys, the document depends on the caller (below)
        openapi_url=None if keyed else "/openapi.json",
        docs_url=None if keyed else "/docs",
        **_telemetry(yard.settings),
    )
    app.state.yard = yard
    adopt_routes(app, yard.router())
    if "images.transform" in yard.task_types:
        from .images import build_image_router

        adopt_routes(app, build_image_router(yard))
    if "csv.stats" in yard.task_types:
        from .csvstats import build_csv_router

        adopt_routes(app, build_csv_router(yard))
    if "ingest.run" in yard.task_types:
        from .ingest import ingestion_of
        from .ingest_api import build_ingest_router

        service = ingestion_of(yard)
        if service is not None:
            adopt_routes(app, build_ingest_router(yard, service))

    if "email.send" in yard.task_types:
        from .email import emails_of
        from .email_api import build_email_router

        adopt_routes(app, build_email_router(yard, emails_of(yard)))

    app.mount("/dashboard", yard.dashboard())
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    if keyed:
        _serve_docs_by_caller(app, yard)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/docs")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app


_OFF = {"tracing": False, "metrics": False, "logs": False}


def _telemetry(settings: Settings) -> dict[str, Any]:
    """FastAPI's own OpenTelemetry for the service app: as FastAPI has it when wanted, else off.

    Without OpenTelemetry configured, FastAPI still asks the three global providers on every
    request whether they are (measured: 6 % of the event loop's time under ``POST /tasks``)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # a FastAPI without native telemetry
    if settings.otel == "on" or (settings.otel == "auto" and otel_configured()):
        return {}
    return {"telemetry": _OFF}


def otel_configured() -> bool:
    """Whether OpenTelemetry is set up in this process now: a global tracer, meter or logger
    provider other than OpenTelemetry's placeholders, or FastAPI asked to set them up."""
    if os.getenv("FASTAPI_OTEL_AUTO_CONFIGURE", "").strip().lower() == "true":
        return True
    from opentelemetry import _logs, metrics, trace

    providers = trace.get_tracer_provider(), metrics.get_meter_provider()
    return any(not _placeholder(p) for p in (*providers, _logs.get_logger_provider()))


def _placeholder(provider: object) -> bool:
    kind = type(provider)
    return kind.__module__.startswith("opentelemetry.") and kind.__name__.lstrip("_").startswith(
        ("Proxy", "NoOp")
    )


def _serve_docs_by_caller(app: FastAPI, yard: Conveyor) -> None:
    """``/openapi.json`` and ``/docs`` when API keys are set: a caller with a key gets the whole
    document, one without it the routes but not the task types and their arguments (the same
    line ``/task-types`` draws with its ``401``)."""
    tenant = tenant_resolver(yard.settings)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        try:
            await tenant(request)
        except HTTPException:
            return JSONResponse(anonymous_openapi(app.openapi()))
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Conveyor")
