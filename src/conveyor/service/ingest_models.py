"""What an ingestion source is, as a client sends it (``POST /ingest/sources``): checked whole
by pydantic, so a bad source is a ``422`` naming its field before anything is stored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from ..cron import zone
from ..errors import InvalidArguments
from ..jobs.upsert import RESERVED

HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$"
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
Clean = Annotated[str, Field(max_length=4096, pattern=r"^[^\x00\r\n]*$")]


class PaginationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "page_number", "offset", "cursor", "link_header", "next_url"] = "none"
    param: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    start: int = Field(default=1, ge=0, le=1_000_000)
    limit_param: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    page_size: int | None = Field(default=None, ge=1, le=100_000)
    cursor_path: str = Field(default="next_cursor", min_length=1, max_length=200)
    next_path: str = Field(default="next", min_length=1, max_length=200)


class CursorIn(BaseModel):
    """Incremental fetching: the highest ``field`` seen is sent back as ``param`` next run,
    less ``lookback_s`` (for numbers and ISO-8601 times)."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(min_length=1, max_length=200)
    param: str = Field(min_length=1, max_length=100)
    lookback_s: float = Field(default=0, ge=0, le=366 * 86400)


class SourceIn(BaseModel):
    """Body of ``POST /ingest/sources``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    url: HttpUrl
    headers: dict[Annotated[str, Field(pattern=HEADER_NAME)], Clean] = Field(
        default_factory=dict, max_length=50, description="Write-only: never shown again."
    )
    params: dict[Annotated[str, Field(min_length=1, max_length=200)], Clean] = Field(
        default_factory=dict, max_length=100
    )
    records_path: str | None = Field(default=None, max_length=200)
    primary_key: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=8
    )
    pagination: PaginationIn = Field(default_factory=PaginationIn)
    cursor: CursorIn | None = None
    every_s: float | None = Field(default=None, ge=1, le=366 * 86400)
    cron: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str = Field(default="UTC", min_length=1, max_length=64)
    max_pages: int = Field(default=10_000, ge=1, le=1_000_000)
    max_response_bytes: int = Field(default=50 * 1_048_576, ge=1024, le=1_073_741_824)
    timeout_s: float = Field(default=30, gt=0, le=600)
    rate_per_s: float | None = Field(default=None, gt=0, le=1000)
    table: str | None = Field(default=None, pattern=IDENTIFIER)
    columns: (
        dict[
            Annotated[str, Field(pattern=IDENTIFIER)],
            Literal["bool", "int", "float", "text", "json"],
        ]
        | None
    ) = Field(
        default=None,
        max_length=500,
        description="The table's columns and their kinds; without it, inferred from the records.",
    )

    @field_validator("primary_key", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zone(value)
        except InvalidArguments as exc:
            raise ValueError(exc.message) from None
        return value

    @model_validator(mode="after")
    def _table_name(self) -> "SourceIn":
        if self.url.scheme not in ("http", "https"):
            raise ValueError("url: http or https only")
        if self.every_s is not None and self.cron is not None:
            raise ValueError("give every_s or cron, not both")
        if self.columns is not None:
            names = [name.lower() for name in self.columns]
            if len(set(names)) < len(names) or set(names) & set(RESERVED):
                raise ValueError(f"columns: names must differ and not be {', '.join(RESERVED)}")
        if self.table is None:
            slug = "".join(c if c.isascii() and c.isalnum() else "_" for c in self.name.lower())
            slug = slug[:50]
            self.table = f"src_{slug}".rstrip("_")
        if self.table.lower().startswith("conveyor_") or self.table.startswith("sqlite_"):
            raise ValueError("table: names starting with conveyor_ or sqlite_ are reserved")
        return self
