"""A schedule fetches a JSON API every N seconds and upserts it into a local table; a route
reads the table. The library's own parts, without the ready service's `/ingest` routes.

SOURCE_URL=https://api.example.com/items FETCH_EVERY_S=60 uvicorn examples.periodic_ingest:app
curl localhost:8000/items            → the records stored so far, each once
curl localhost:8000/items/fetches    → the schedule's history (each planned fire and its task)
curl localhost:8000/tasks/<task_id>  → one fetch: its pages and rows
"""

import functools
import os
from typing import Annotated, Any

import anyio
import httpx
import sqlalchemy as sa
from fastapi import FastAPI, Query

from conveyor import Conveyor, Settings, TaskContext
from conveyor.jobs.fetch import Pagination, pages
from conveyor.jobs.netguard import guarded_transport
from conveyor.jobs.upsert import Target

settings = Settings()
SOURCE_URL = os.environ.get("SOURCE_URL", "https://api.example.com/items")
EVERY_S = float(os.environ.get("FETCH_EVERY_S", "60"))
ALLOW = [h for h in os.environ.get("CONVEYOR_INGEST_ALLOW_HOSTS", "").split(",") if h]

yard = Conveyor(settings)
settings.data_dir.mkdir(parents=True, exist_ok=True)
items = Target(sa.create_engine(f"sqlite:///{settings.data_dir / 'items.db'}"), "items", ["id"])


@yard.periodic(every_s=EVERY_S, name="fetch-items", misfire="run_once")
@yard.task(timeout_s=300)
async def fetch_items(ctx: TaskContext) -> dict[str, int]:
    """Every page of the API (its `next` field links the pages), upserted by `id`."""
    counts = {"pages": 0, "inserted": 0, "updated": 0, "unchanged": 0}
    transport = guarded_transport(ALLOW)  # inside addresses refused, except the allowed hosts
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        paging = Pagination(type="next_url", next_path="next")
        async for page in pages(client, SOURCE_URL, records_path="results", pagination=paging):
            write = functools.partial(items.write_page, page.records, source_id="items")
            outcome = await anyio.to_thread.run_sync(write)
            counts["pages"] += 1
            counts["inserted"] += outcome.inserted
            counts["updated"] += outcome.updated
            counts["unchanged"] += outcome.unchanged
            ctx.progress(0, f"{counts['pages']} pages")
    return counts


app = FastAPI(lifespan=yard.lifespan)
app.include_router(yard.router())  # /tasks, /schedules: each fetch is a task to look at


@app.get("/items")
async def read_items(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
    rows = await anyio.to_thread.run_sync(functools.partial(items.rows, after=0, limit=limit))
    return [record for _, record in rows]


@app.get("/items/fetches")
async def fetches() -> list[dict[str, Any]]:
    schedule = await yard.schedules.store.by_name("fetch-items", owner="")
    if schedule is None:
        return []
    return [f.to_json() for f in await yard.schedules.fires(schedule.id, owner="")]
