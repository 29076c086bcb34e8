"""POST /images over a real uvicorn: uploads, progress, results, batches, and refusals."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.images import RED, animated_gif, close, encode, open_bytes, png_header_only, quadrants
from .support.live import LiveServer, follow, service_settings

JPEG = encode(quadrants(400, 200), "JPEG", quality=95)


@pytest.fixture
def server(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> LiveServer:
    return serve(create_app(service_settings(tmp_path, max_upload_bytes=2_000_000)))


@pytest.fixture
def client(server: LiveServer) -> Any:
    with server.client() as c:
        yield c


def upload(
    client: httpx.Client,
    files: list[tuple[str, bytes]],
    operations: list[dict[str, Any]] | str | None = None,
    **fields: str,
) -> httpx.Response:
    data = dict(fields)
    if operations is not None:
        data["operations"] = operations if isinstance(operations, str) else json.dumps(operations)
    parts = [("file", (name, content, "application/octet-stream")) for name, content in files]
    return client.post("/images", files=parts, data=data)


def follow_progress(
    client: httpx.Client, task_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    task, events = follow(client, task_id)
    return task, [data for kind, data in events if kind == "progress"]


def test_thumbnail_end_to_end(client: httpx.Client, tmp_path: Path) -> None:
    response = upload(
        client,
        [("holiday photo.jpg", JPEG)],
        [{"op": "thumbnail", "width": 100, "height": 100}, {"op": "grayscale"}],
        format="png",
    )
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["name"] == "images.transform" and response.headers["location"].endswith(task["id"])
    done, _ = follow_progress(client, task["id"])
    assert done["status"] == "completed", done["error"]
    assert done["result"] == {
        "width": 100,
        "height": 50,
        "format": "PNG",
        "content_type": "image/png",
        "bytes": done["result"]["bytes"],
        "frames": 1,
    }
    assert done["progress"] == 100  # per-operation reports: tests/test_images.py
    result = client.get(f"/tasks/{task['id']}/result")
    assert result.status_code == 200
    assert result.headers["content-type"] == "image/png"
    assert 'filename="holiday_photo.png"' in result.headers["content-disposition"]
    image = open_bytes(result.content)
    assert image.size == (100, 50) and image.mode == "L"
    assert len(result.content) == done["result"]["bytes"]
    # deleting the task removes its blobs (the upload and the output)
    folder = tmp_path / "blobs" / task["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["result.png", "source"]
    assert client.delete(f"/tasks/{task['id']}").status_code == 204
    assert not folder.exists()


def test_default_format_is_the_input_format(client: httpx.Client) -> None:
    task = upload(client, [("a.gif", animated_gif(3))], [{"op": "resize", "width": 15}]).json()
    done, _ = follow_progress(client, task["id"])
    assert done["result"]["format"] == "GIF" and done["result"]["frames"] == 3
    image = open_bytes(client.get(f"/tasks/{task['id']}/result").content)
    assert getattr(image, "n_frames", 1) == 3


def test_batch_makes_one_task_per_file(client: httpx.Client) -> None:
    files = [(f"img{i}.png", encode(quadrants(40 + 10 * i, 20), "PNG")) for i in range(3)]
    response = upload(client, files, [{"op": "resize", "height": 10}])
    assert response.status_code == 202
    items = response.json()["items"]
    assert len(items) == 3 and len({t["id"] for t in items}) == 3
    widths = [follow_progress(client, t["id"])[0]["result"]["width"] for t in items]
    assert widths == [20, 25, 30]


def test_batch_as_one_zip(client: httpx.Client) -> None:
    files = [
        ("same.png", encode(quadrants(), "PNG")),
        ("same.png", JPEG),
        ("x.webp", encode(quadrants(), "WEBP")),
    ]
    response = upload(
        client, files, [{"op": "thumbnail", "width": 10, "height": 10}], bundle="zip", format="JPEG"
    )
    assert response.status_code == 202
    task = response.json()
    assert task["name"] == "images.transform_zip"
    done, _ = follow_progress(client, task["id"])
    assert done["status"] == "completed", done["error"]
    result = client.get(f"/tasks/{task['id']}/result")
    assert result.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(result.content)) as archive:
        names = archive.namelist()
        assert len(names) == 3 and len(set(names)) == 3
        for name in names:
            assert open_bytes(archive.read(name)).format == "JPEG"
    assert [f["name"] for f in done["result"]["files"]] == names


def test_truncated_upload_fails_the_task_clearly(client: httpx.Client) -> None:
    photo = encode(quadrants(400, 400), "JPEG", quality=95)
    task = upload(client, [("cut.jpg", photo[: len(photo) // 3])]).json()
    done, _ = follow_progress(client, task["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "ImageError"
    assert "truncated or corrupt" in done["error"]["message"]
    assert client.get("/health").status_code == 200


def test_wrong_extension_is_sniffed(client: httpx.Client) -> None:
    task = upload(client, [("really-a-png.jpg", encode(quadrants(), "PNG"))]).json()
    done, _ = follow_progress(client, task["id"])
    assert done["result"]["format"] == "PNG"
    assert close(
        open_bytes(client.get(f"/tasks/{task['id']}/result").content)
        .convert("RGB")
        .getpixel((1, 1)),
        RED,
    )


@pytest.mark.parametrize(
    ("files", "status", "words"),
    [
        pytest.param(
            [("empty.png", b"")], 415, ["empty.png", "not an accepted image"], id="zero-bytes"
        ),
        pytest.param([("doc.pdf", b"%PDF-1.7\n...")], 415, ["doc.pdf"], id="pdf"),
        pytest.param(
            [("v.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>")], 415, ["v.svg"], id="svg"
        ),
        pytest.param(
            [("bomb.png", png_header_only(30_000, 30_000))],
            413,
            ["pixel limit", "900000000"],
            id="bomb",
        ),
        pytest.param(
            [("ok.png", encode(quadrants(), "PNG")), ("bad.txt", b"hello")],
            415,
            ["bad.txt"],
            id="one-bad-in-a-batch",
        ),
    ],
)
def test_refused_uploads(
    client: httpx.Client,
    tmp_path: Path,
    files: list[tuple[str, bytes]],
    status: int,
    words: list[str],
) -> None:
    response = upload(client, files)
    assert response.status_code == status, response.text
    detail = str(response.json()["detail"])
    for word in words:
        assert word in detail
    assert client.get("/tasks").json()["items"] == []  # nothing accepted, nothing stored
    assert not any((tmp_path / "blobs").glob("*/*"))


def test_oversized_upload(client: httpx.Client) -> None:
    big = encode(quadrants(), "PNG") + b"\0" * 3_000_000
    response = upload(client, [("big.png", big)])
    assert response.status_code == 413 and "exceeds" in response.json()["detail"]


@pytest.mark.parametrize(
    ("operations", "location"),
    [
        pytest.param(
            [{"op": "resize", "width": 0}], ["body", "operations", 0, "resize", "width"], id="zero"
        ),
        pytest.param(
            [{"op": "flip"}, {"op": "blur", "radius": -1}],
            ["body", "operations", 1, "blur", "radius"],
            id="negative",
        ),
        pytest.param(
            [{"op": "resize", "width": 10**9}],
            ["body", "operations", 0, "resize", "width"],
            id="enormous",
        ),
        pytest.param([{"op": "melt"}], ["body", "operations", 0], id="unknown-op"),
        pytest.param("[{", ["body", "operations"], id="not-json"),
        pytest.param('{"op": "flip"}', ["body", "operations"], id="not-a-list"),
    ],
)
def test_bad_operations_name_the_operation_and_field(
    client: httpx.Client, operations: Any, location: list[Any]
) -> None:
    response = upload(client, [("a.png", encode(quadrants(), "PNG"))], operations)
    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert location in locations, locations


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        pytest.param({"format": "EPS"}, "format", id="format"),
        pytest.param({"quality": "0"}, "quality", id="quality-zero"),
        pytest.param({"quality": "many"}, "quality", id="quality-text"),
        pytest.param({"bundle": "tar"}, "bundle", id="bundle"),
    ],
)
def test_bad_options(client: httpx.Client, fields: dict[str, str], word: str) -> None:
    response = upload(client, [("a.png", encode(quadrants(), "PNG"))], None, **fields)
    assert response.status_code == 422 and word in json.dumps(response.json())


def test_not_multipart_and_no_file(client: httpx.Client) -> None:
    response = client.post("/images", json={"file": "x"})
    assert response.status_code == 415 and "multipart" in response.json()["detail"]
    response = client.post("/images", data={"operations": "[]"}, files=[("other", ("a", b"x"))])
    assert response.status_code == 422 and "file" in json.dumps(response.json())


def test_internal_image_tasks_are_not_submittable_by_name(client: httpx.Client) -> None:
    response = client.post(
        "/tasks", json={"name": "images.transform", "args": {"source": "x", "pipeline": {}}}
    )
    assert response.status_code == 422 and "unknown task type" in response.text


def test_several_files_are_accepted_all_or_none(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, max_queued=3)
    server = serve(create_app(settings, run_workers=False))
    with server.client() as client:
        first = upload(client, [("a.jpg", JPEG), ("b.jpg", JPEG)])
        assert first.status_code == 202 and len(first.json()["items"]) == 2
        refused = upload(client, [("c.jpg", JPEG), ("d.jpg", JPEG)])
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        listed = client.get("/tasks", params={"limit": 10}).json()["items"]
        assert len(listed) == 2, "no task of the refused request was committed"
        blobs = [p.name for p in (tmp_path / "blobs").iterdir() if not p.name.startswith(".")]
        assert sorted(blobs) == sorted(t["id"] for t in first.json()["items"])
        one = upload(client, [("e.jpg", JPEG)])
        assert one.status_code == 202, "the room left is still there"
