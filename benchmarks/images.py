"""Thumbnails (256x256 box, JPEG q85) of 12-megapixel JPEGs: through the service vs bare Pillow.

- bare: a loop of Pillow calls on a 2-process pool, reading the same files from disk;
- drain: the images uploaded with `POST /images` to `conveyor serve --no-workers`, then drained
  by the embedded engine (2 worker processes), timed from the first start to the last finish;
- end to end: `conveyor serve` with its workers while a client in another process uploads, timed
  from the first upload to the last result (the uploads share the 2 cores with the decoding).

Run with `make bench` (or `.venv/bin/python -m benchmarks.images --images 200`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageChops, ImageFilter

from .support import free_port, serve

OPERATIONS = json.dumps([{"op": "thumbnail", "width": 256, "height": 256}])


def make_photos(folder: Path, count: int) -> list[Path]:
    """Distinct 4000x3000 JPEGs with photo-like detail and grain (q90, about 4 MB each)."""
    paths = []
    for index in range(count):
        small = Image.effect_noise((800, 600), 50 + index).convert("RGB")
        small = small.filter(ImageFilter.GaussianBlur(1))
        photo = small.resize((4000, 3000), Image.Resampling.BICUBIC)
        grain = Image.effect_noise((4000, 3000), 8).convert("RGB")
        photo = ImageChops.add(photo, grain, scale=1.0, offset=-128)
        path = folder / f"photo-{index}.jpg"
        photo.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def bare_thumbnail(path: Path) -> int:
    with Image.open(path) as image:
        image.thumbnail((256, 256))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
    return len(buffer.getvalue())


def bare(paths: list[Path]) -> float:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.map(bare_thumbnail, paths[:2])  # warm the workers
        started = time.perf_counter()
        pool.map(bare_thumbnail, paths, chunksize=1)
        return len(paths) / (time.perf_counter() - started)


async def upload_all(url: str, paths: list[Path], uploaders: int, *, wait: bool) -> list[str]:
    contents = {path: path.read_bytes() for path in set(paths)}
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def uploader() -> None:
            while not queue.empty():
                path = queue.get_nowait()
                response = await client.post(
                    "/images",
                    files={"file": (path.name, contents[path], "image/jpeg")},
                    data={"operations": OPERATIONS, "format": "JPEG", "quality": "85"},
                )
                response.raise_for_status()
                ids.append(response.json()["id"])

        await asyncio.gather(*(uploader() for _ in range(uploaders)))
        if wait:
            for task_id in ids:
                async with client.stream("GET", f"/tasks/{task_id}/events") as stream:
                    async for _ in stream.aiter_lines():
                        pass
    return ids


def rate_from_records(data_dir: Path, *, since: str) -> float:
    """Images/s from the store: completed tasks over [first `since`, last finished_at]."""
    import sqlite3

    with sqlite3.connect(data_dir / "conveyor.db") as db:
        statuses = dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status"))
        first, last = db.execute(f"SELECT min({since}), max(finished_at) FROM tasks").fetchone()
    assert set(statuses) == {"completed"}, statuses
    return statuses["completed"] / (last - first)


async def drain(data_dir: Path, count: int) -> None:
    from conveyor import Settings, TaskStatus
    from conveyor.service import build_yard

    yard = build_yard(Settings(data_dir=data_dir, process_workers=2))
    async with yard:
        while (await yard.store.count_by_status())[TaskStatus.COMPLETED] < count:
            await asyncio.sleep(0.05)


def service(folder: Path, paths: list[Path], uploaders: int, *, workers: bool) -> float:
    port = free_port()
    env = {
        **os.environ,
        "CONVEYOR_DATA_DIR": str(folder),
        "CONVEYOR_PROCESS_WORKERS": "2",
        "CONVEYOR_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
    }
    command = [sys.executable, "-m", "conveyor", "serve", "--log-level", "warning"]
    flag = "--workers" if workers else "--no-workers"
    server = serve([*command, flag, "--no-access-log", "--port", str(port)], port, env)
    try:
        asyncio.run(upload_all(f"http://127.0.0.1:{port}", paths, uploaders, wait=workers))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    if workers:
        return rate_from_records(folder, since="created_at")
    asyncio.run(drain(folder, len(paths)))
    return rate_from_records(folder, since="started_at")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--uploaders", type=int, default=4)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = make_photos(folder, options.distinct)
        paths = [photos[i % len(photos)] for i in range(options.images)]
        size_mb = sum(p.stat().st_size for p in photos) / len(photos) / 1e6
        bare_before = bare(paths)
        drain_rate = service(folder / "drain", paths, options.uploaders, workers=False)
        e2e_rate = service(folder / "e2e", paths, options.uploaders, workers=True)
        bare_after = bare(paths)
        bare_rate = (bare_before + bare_after) / 2  # the machine's speed drifts within a run
    print(f"\n{options.images} thumbnails of 4000x3000 JPEGs ({size_mb:.1f} MB each)")
    print(
        f"bare Pillow, 2-process pool        {bare_rate:7.1f} images/s  "
        f"(mean of {bare_before:.1f} before and {bare_after:.1f} after)"
    )
    print(
        f"uploaded, then drained by engine   {drain_rate:7.1f} images/s  "
        f"{drain_rate / bare_rate:.2f}x bare (target ≥ 0.85)"
    )
    print(
        f"uploaded while the engine runs     {e2e_rate:7.1f} images/s  "
        f"{e2e_rate / bare_rate:.2f}x bare (uploads share the 2 cores)"
    )


if __name__ == "__main__":
    main()
