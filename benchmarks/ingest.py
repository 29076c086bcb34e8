"""Ingestion of a paginated JSON API into SQLite: the service against a bare loop, same pages.

A local HTTP server (uvicorn, its own process) serves `--records` records (default 1,000,000) in
pages of 1,000, 10 fields each, `page_number` pagination. Each round, in a fresh folder:

- bare: `httpx.Client` + `json.loads` + `sqlite3` `executemany` of an `INSERT … ON CONFLICT DO
  UPDATE` per page, one transaction per page (no hashing, no checks, no cursor);
- fetch only: the same pages fetched and parsed, nothing written (what any run pays);
- service: the `ingest.run` task of the ready service, in a child process running the embedded
  engine (the source made with `Ingestion.create`, the run submitted and awaited), reporting its
  peak RSS; then a second run with nothing changed (unchanged rows are not rewritten).

Rounds alternate; medians are printed. Run with
`.venv/bin/python -m benchmarks.ingest [--records N] [--rounds K]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .support import free_port

PAGE = 1000
SERVER = """
import orjson, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

TOTAL = {total}

async def items(request):
    page = int(request.query_params.get("page", "1"))
    start = (page - 1) * {page}
    rows = [
        {{"id": i, "name": f"item {{i}}", "price": i * 0.25, "qty": i % 17, "active": i % 2 == 0,
          "city": ("Oslo", "Rome", "Lima")[i % 3], "code": f"C{{i:08d}}", "score": (i * 7) % 1000,
          "updated_at": "2026-01-01T00:00:00Z", "note": "x" * (i % 20)}}
        for i in range(start + 1, min(start + {page}, TOTAL) + 1)
    ]
    return Response(orjson.dumps({{"items": rows}}), media_type="application/json")

app = Starlette(routes=[Route("/items", items)])
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning", access_log=False)
"""

SERVICE = """
import asyncio, json, resource, sys, time
from pathlib import Path
from conveyor import Settings
from conveyor.service import build_yard
from conveyor.service.ingest import ingestion_of
from conveyor.service.ingest_models import SourceIn

async def main(data_dir, url):
    yard = build_yard(Settings(data_dir=Path(data_dir), ingest_allow_hosts="127.0.0.1",
                               process_warmup=False))
    async with yard:
        service = ingestion_of(yard)
        spec = SourceIn(name="bench", url=url, records_path="items", primary_key=["id"],
                        pagination={"type": "page_number"}, max_pages=100000)
        source = await service.create(spec, owner="")
        times = []
        for _ in range(2):
            started = time.perf_counter()
            record, _ = await yard.submit("ingest.run", {"source_id": source["id"]}, owner="")
            done = await yard.wait(record.id, timeout_s=3600)
            assert done.status.value == "completed", done.error
            times.append((time.perf_counter() - started, done.result))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "rss_mb": rss}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def bare(url: str, db_path: Path, total: int) -> float:
    """httpx + json + executemany upsert, one transaction per page."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, qty INTEGER, "
        "active INTEGER, city TEXT, code TEXT, score INTEGER, updated_at TEXT, note TEXT, "
        "raw TEXT)"
    )
    sql = (
        "INSERT INTO items VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
        "name=excluded.name, price=excluded.price, qty=excluded.qty, active=excluded.active, "
        "city=excluded.city, code=excluded.code, score=excluded.score, "
        "updated_at=excluded.updated_at, note=excluded.note, raw=excluded.raw"
    )
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        page = 1
        while True:
            records = json.loads(client.get(url, params={"page": page}).content)["items"]
            if not records:
                break
            db.execute("BEGIN")
            db.executemany(
                sql,
                [
                    (
                        r["id"],
                        r["name"],
                        r["price"],
                        r["qty"],
                        r["active"],
                        r["city"],
                        r["code"],
                        r["score"],
                        r["updated_at"],
                        r["note"],
                        json.dumps(r),
                    )
                    for r in records
                ],
            )
            db.execute("COMMIT")
            page += 1
    elapsed = time.perf_counter() - started
    (count,) = db.execute("SELECT count(*) FROM items").fetchone()
    assert count == total, count
    db.close()
    return elapsed


def fetch_only(url: str) -> float:
    """The floor of any run: the same pages fetched and parsed, nothing written."""
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        page = 1
        while json.loads(client.get(url, params={"page": page}).content)["items"]:
            page += 1
    return time.perf_counter() - started


def service(url: str, data_dir: Path) -> tuple[float, float, float, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-c", SERVICE, str(data_dir), url],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (first, result), (second, again) = report["times"]
    assert again["rows_unchanged"] == result["rows_inserted"], again
    return first, second, report["rss_mb"], result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(total=options.records, page=PAGE, port=port)]
    )
    url = f"http://127.0.0.1:{port}/items"
    try:
        for _ in range(100):
            try:
                httpx.get(url, params={"page": 1}, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        bare_s: list[float] = []
        fetch_s: list[float] = []
        first_s: list[float] = []
        second_s: list[float] = []
        rss: list[float] = []
        for round_no in range(options.rounds):
            fetch_s.append(fetch_only(url))
            with tempfile.TemporaryDirectory() as folder:
                bare_s.append(bare(url, Path(folder) / "bare.db", options.records))
            with tempfile.TemporaryDirectory() as folder:
                first, second, peak, result = service(url, Path(folder))
                first_s.append(first)
                second_s.append(second)
                rss.append(peak)
            print(
                f"round {round_no + 1}: bare {options.records / bare_s[-1]:,.0f} rows/s, "
                f"service {options.records / first:,.0f} rows/s, second run {second:.1f} s, "
                f"peak RSS {peak:.0f} MB, pages {result['pages']}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(10)
    bare_rate = options.records / statistics.median(bare_s)
    first_rate = options.records / statistics.median(first_s)
    print()
    print(f"records: {options.records:,} in pages of {PAGE}, 10 fields; {options.rounds} rounds")
    print("| figure | median |")
    print("| --- | --- |")
    print(f"| bare loop (httpx + json + executemany upsert) | {bare_rate:,.0f} rows/s |")
    print(f"| service, first run | {first_rate:,.0f} rows/s |")
    print(f"| ratio service / bare | {first_rate / bare_rate:.2f}x |")
    print(f"| service, second run (nothing changed) | {statistics.median(second_s):.1f} s |")
    ratio = statistics.median(first_s) / statistics.median(second_s)
    print(f"| first run / second run | {ratio:.1f}x |")
    print(f"| fetch and parse only (the floor of any run) | {statistics.median(fetch_s):.1f} s |")
    print(f"| worker peak RSS | {max(rss):.0f} MB |")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"(this process's peak RSS, the bare loop's: {own} MB)")


if __name__ == "__main__":
    main()
