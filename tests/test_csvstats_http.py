"""POST /csv-stats over a real uvicorn: multipart and raw bodies, gzip, options, refusals."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .conftest import LiveServer, follow
from .test_http import service_settings

CSV = b"city,temp,rain\nOslo,3.5,true\nRome,17.25,false\nOslo,4.0,\nLima,,true\n"


@pytest.fixture
def client(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> Any:
    server = serve(create_app(service_settings(tmp_path, max_upload_bytes=100_000)))
    with server.client() as c:
        yield c


def finished(client: httpx.Client, task_id: str) -> tuple[dict[str, Any], list[float]]:
    task, events = follow(client, task_id)
    return task, [data["progress"] for kind, data in events if kind == "progress"]


def test_multipart_upload(client: httpx.Client, tmp_path: Path) -> None:
    response = client.post("/csv-stats", files={"file": ("weather.csv", CSV, "text/csv")})
    assert response.status_code == 202, response.text
    task, _ = finished(client, response.json()["id"])
    assert task["status"] == "completed", task["error"]
    result = task["result"]
    assert result["rows"] == 4 and result["encoding"] == "utf-8"
    columns = {c["name"]: c for c in result["columns"]}
    assert columns["city"]["top_values"][0] == {"value": "Oslo", "count": 2}
    assert columns["temp"]["type"] == "float" and columns["temp"]["nulls"] == 1
    assert columns["temp"]["mean"] == pytest.approx((3.5 + 17.25 + 4.0) / 3)
    assert columns["rain"]["type"] == "boolean"
    assert client.delete(f"/tasks/{task['id']}").status_code == 204
    assert not (tmp_path / "blobs" / task["id"]).exists()


def test_raw_gzip_body_with_options(client: httpx.Client) -> None:
    body = gzip.compress(b"a;b\n1;x\n2;y\n")
    response = client.post(
        "/csv-stats",
        content=body,
        params={"delimiter": ";", "columns": "b"},
        headers={"content-type": "application/gzip"},
    )
    assert response.status_code == 202, response.text
    task, _ = finished(client, response.json()["id"])
    assert [c["name"] for c in task["result"]["columns"]] == ["b"]
    assert task["result"]["delimiter"] == ";"


def test_text_csv_body_and_progress(client: httpx.Client) -> None:
    response = client.post("/csv-stats", content=CSV, headers={"content-type": "text/csv"})
    task, progress = finished(client, response.json()["id"])
    assert task["status"] == "completed" and task["progress"] == 100
    assert progress == sorted(progress)


def test_a_task_that_cannot_read_its_file_fails_clearly(client: httpx.Client) -> None:
    response = client.post(
        "/csv-stats",
        content=b"a,b\n1,2\n",
        params={"columns": "zzz"},
        headers={"content-type": "text/csv"},
    )
    task, _ = finished(client, response.json()["id"])
    assert task["status"] == "failed" and "unknown columns" in task["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "word"),
    [
        pytest.param(
            {"content": b"", "headers": {"content-type": "text/csv"}}, 422, "empty", id="empty"
        ),
        pytest.param(
            {"files": {"file": ("x.csv", b"\x89PNG\r\n\x1a\n" + bytes(300), "text/csv")}},
            415,
            "binary",
            id="png-named-csv",
        ),
        pytest.param(
            {"content": bytes(range(32)) * 100, "headers": {"content-type": "text/csv"}},
            415,
            "binary",
            id="binary",
        ),
        pytest.param(
            {"content": b"a\n" * 60_000, "headers": {"content-type": "text/csv"}},
            413,
            "exceeds",
            id="too-big",
        ),
        pytest.param({"json": {"a": 1}}, 415, "text/csv", id="json"),
        pytest.param(
            {
                "content": b"a\n1\n",
                "headers": {"content-type": "text/csv"},
                "params": {"delimiter": ";;"},
            },
            422,
            "delimiter",
            id="bad-delimiter",
        ),
        pytest.param(
            {
                "content": b"a\n1\n",
                "headers": {"content-type": "text/csv"},
                "params": {"encoding": "ebcdic"},
            },
            422,
            "encoding",
            id="bad-encoding",
        ),
        pytest.param(
            {"files": {"other": ("x.csv", b"a\n1\n", "text/csv")}}, 422, "file", id="no-file-field"
        ),
    ],
)
def test_refused_at_submit(
    client: httpx.Client, kwargs: dict[str, Any], status: int, word: str
) -> None:
    response = client.post("/csv-stats", **kwargs)
    assert response.status_code == status, response.text
    assert word in json.dumps(response.json()).lower()
    assert client.get("/tasks").json()["items"] == []
