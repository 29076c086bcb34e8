"""Settings, read from ``CONVEYOR_*`` environment variables at the edge and passed in explicitly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError, TaskTypeError
from .rates import parse_duration, parse_rate


class Settings(BaseSettings):
    """Conveyor's settings; each field is also ``CONVEYOR_<FIELD>`` in the environment.

    Example:
        ``Settings(database_url="sqlite:///./var/app.db", concurrency=32)``
    """

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", extra="ignore", env_parse_none_str="none"
    )

    engine: Literal["local", "celery"] = "local"
    database_url: str | None = Field(
        default=None, description="Defaults to sqlite:///<data_dir>/conveyor.db."
    )
    broker_url: str | None = None
    data_dir: Path = Path("./var")
    api_keys: str = Field(
        default="",
        description="Comma-separated `tenant:key` pairs (a bare `key` is tenant `default`).",
    )
    dashboard_secret: SecretStr | None = Field(
        default=None,
        description="Signs dashboard sessions and CSRF tokens (default: from the API keys).",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for GET /metrics (needed there when API keys are set).",
    )
    concurrency: int = Field(default=16, ge=1, le=10_000, description="Global limit per process.")
    process_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    process_warmup: bool = Field(
        default=True, description="Start the worker processes with the engine, not on first use."
    )
    max_queued: int | None = Field(default=100_000, ge=1)
    lease_s: float = Field(default=30.0, gt=0.5, description="Lease of a claimed task.")
    poll_s: float = Field(default=0.1, gt=0, le=10, description="Idle poll of the store.")
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    smtp_url: SecretStr = Field(
        default=SecretStr("smtp://127.0.0.1:25"),
        description="Email service: smtp://user:password@host:port or smtps://… (never echoed).",
    )
    smtp_from: str | None = Field(default=None, description="Email service: default sender.")
    smtp_connections: int = Field(
        default=4, ge=1, le=100, description="Email service: SMTP connections (sends at once)."
    )
    smtp_rate: str | None = Field(
        default=None, description="Email service: at most this many sends, e.g. '20/s'."
    )
    email_max_recipients: int = Field(default=100_000, ge=1, le=1_000_000)
    email_retries: int = Field(
        default=5, ge=0, le=50, description="Email service: retries after a 4xx reply."
    )
    max_batch_items: int = Field(
        default=100_000, ge=1, le=10_000_000, description="Items in one batch (POST /batches)."
    )
    max_batch_bytes: int = Field(
        default=64 * 1_048_576, ge=1024, description="Cap of one POST /batches body."
    )
    max_upload_bytes: int = Field(
        default=50 * 1_048_576, ge=1024, description="Cap of one multipart upload request."
    )
    otel: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "FastAPI's OpenTelemetry in the service app; auto: on when OpenTelemetry is set up "
            "in the process when the app is made."
        ),
    )
    csv_memory_limit: str = Field(
        default="256MB", pattern=r"^[0-9]+(KB|MB|GB)$", description="DuckDB's limit per CSV task."
    )
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, le=89_478_485, description="Refused before decoding beyond."
    )
    sqlite_busy_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a write waits for another process's lock on the SQLite file.",
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = Field(
        default="NORMAL",
        description="NORMAL survives a process crash (kill -9); FULL also survives power loss.",
    )
    database_pool_size: int = Field(
        default=10, ge=1, le=1000, description="PostgreSQL connections per process."
    )
    celery_queue: str = Field(
        default="conveyor",
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="The broker queue Conveyor's Celery messages go through.",
    )
    sweep_s: float = Field(
        default=0.25, gt=0, le=60, description="Celery engine: how often due tasks are sent."
    )
    republish_after_s: float = Field(
        default=60.0,
        gt=0,
        description="Celery engine: a queued task's message is sent again after this long.",
    )
    ingest_database_url: str | None = Field(
        default=None,
        description="Where ingested tables live; defaults to sqlite:///<data_dir>/ingest.db.",
    )
    ingest_allow_hosts: str = Field(
        default="",
        description="Comma-separated hosts the ingestion may fetch although they resolve to "
        "loopback or private addresses (every other inside address is refused).",
    )
    result_ttl: str | None = Field(
        default="7d",
        description="Finished tasks (their results, blobs and log lines) are deleted this long "
        "after they finished: 7d, 12h, 30m, 90s, or none to keep them.",
    )
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=300.0, ge=0)

    @field_validator("smtp_rate")
    @classmethod
    def _a_rate(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_rate(value)
            except TaskTypeError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("result_ttl")
    @classmethod
    def _a_duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def result_ttl_s(self) -> float | None:
        """``result_ttl`` in seconds (None: kept for ever)."""
        return None if self.result_ttl is None else parse_duration(self.result_ttl)

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("sqlite:///", "postgresql://", "postgres://")
        ):
            raise ValueError("database_url must start with sqlite:/// or postgresql://")
        return value

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'conveyor.db'}"
        if self.engine == "celery":
            if self.database_url.startswith("sqlite:"):
                raise ValueError(
                    "the celery engine needs a PostgreSQL store that every worker can reach: "
                    "set CONVEYOR_DATABASE_URL=postgresql://user:password@host:5432/db "
                    "(SQLite is a file on one machine)"
                )
            if not self.broker_url or not self.broker_url.startswith(
                ("redis://", "rediss://", "amqp://", "amqps://")
            ):
                raise ValueError(
                    "the celery engine needs a broker: set CONVEYOR_BROKER_URL=redis://host:6379/0 "
                    "or amqp://user:password@host:5672//"
                )
        return self

    @property
    def store_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    def sqlite_path(self) -> Path:
        """The SQLite file named by ``database_url`` (``sqlite:///relative`` or ``sqlite:////abs``)."""
        if not self.store_url.startswith("sqlite:///"):
            raise ConfigurationError(f"not a SQLite URL: {self.store_url!r}")
        return Path(self.store_url.removeprefix("sqlite:///"))

    def tenants_by_key(self) -> dict[str, str]:
        """API keys mapped to tenant names; empty when authentication is off."""
        keys: dict[str, str] = {}
        for item in self.api_keys.split(","):
            item = item.strip()
            if not item:
                continue
            tenant, sep, key = item.partition(":")
            if not sep:
                tenant, key = "default", tenant
            if not key or not tenant:
                raise ConfigurationError(f"malformed CONVEYOR_API_KEYS entry {item!r}")
            keys[key] = tenant
        return keys


_SECRET_PARTS = ("key", "url")  # API keys, and URLs that may carry a password


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem of a :class:`Settings` validation error, naming its environment
    variable: ``CONVEYOR_LEASE_S: Input should be greater than 0.5 (got '0.1')``."""
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            lines.append(message)
            continue
        field = str(error["loc"][0])
        shown = "" if any(part in field for part in _SECRET_PARTS) else f" (got {error['input']!r})"
        lines.append(f"CONVEYOR_{field.upper()}: {message}{shown}")
    return lines
