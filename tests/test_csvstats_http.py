"""POST /csv-stats over a real uvicorn: multipart and raw bodies, gzip, options, refusals."""

from __future__ import annotations

import csv
import gzip
import io
import json
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.live import LiveServer, follow, service_settings

CSV = b"city,temp,rain\nOslo,3.5,true\nRome,17.25,false\nOslo,4.0,\nLima,,true\n"


@pytest.fixture
def client(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> Any:
    server = serve(create_app(service_settings(tmp_path, max_upload_bytes=100_000)))
    with server.client() as c:
        yield c


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {column["name"]: column for column in result["columns"]}


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
    export = client.get(f"/csv-stats/{task['id']}/statistics.csv")  # no result to export
    assert export.status_code == 409 and "failed" in export.json()["detail"]


def numbered_csv(rows: int) -> bytes:
    """``n,word`` rows: n from 0, words from 7 distinct values."""
    return b"n,word\n" + b"".join(b"%d,w%d\n" % (i, i % 7) for i in range(rows))


@pytest.mark.parametrize("how", ["raw", "multipart"])
def test_uploads_over_several_write_blocks_arrive_whole(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, how: str
) -> None:
    rows = 300_000  # about 5 MB: several of the upload writer's blocks
    body = numbered_csv(rows)
    server = serve(create_app(service_settings(tmp_path, max_upload_bytes=10_000_000)))
    with server.client() as client:
        if how == "raw":
            response = client.post("/csv-stats", content=body, headers={"content-type": "text/csv"})
        else:
            response = client.post(
                "/csv-stats",
                files={"file": ("big.csv", body, "text/csv")},
                data={"delimiter": ","},
            )
        assert response.status_code == 202, response.text
        task, _ = finished(client, response.json()["id"])
    assert task["status"] == "completed", task["error"]
    columns = by_name(task["result"])
    assert task["result"]["rows"] == rows and columns["n"]["max"] == rows - 1
    assert columns["n"]["mean"] == pytest.approx((rows - 1) / 2)
    assert columns["word"]["distinct"] == 7 and not task["result"]["warnings"]


@contextmanager
def files_capped_at(size: int) -> Iterator[None]:
    """This process (the live server's) cannot grow a file past ``size`` bytes: writes past it
    fail with EFBIG, as they fail with ENOSPC on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("how", ["raw", "multipart"])
def test_no_room_for_an_upload_answers_507_and_keeps_nothing(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path, how: str
) -> None:
    rows = 300_000  # about 5 MB, past the 1 MB the server may write
    body = numbered_csv(rows)
    server = serve(create_app(service_settings(tmp_path, max_upload_bytes=10_000_000)))

    def upload(client: httpx.Client) -> httpx.Response:
        if how == "raw":
            return client.post("/csv-stats", content=body, headers={"content-type": "text/csv"})
        return client.post("/csv-stats", files={"file": ("big.csv", body, "text/csv")})

    with server.client() as client:
        with files_capped_at(1_000_000):
            refused = upload(client)
        assert refused.status_code == 507, refused.text
        assert "no room on the server's disk" in refused.json()["detail"]
        assert list((tmp_path / "blobs" / ".uploads").iterdir()) == []  # nothing staged is left
        assert client.get("/tasks").json()["items"] == []  # and no task was created
        accepted = upload(client)  # with room again, the same upload goes through
        assert accepted.status_code == 202, accepted.text
        task, _ = finished(client, accepted.json()["id"])
    assert task["status"] == "completed", task["error"]
    assert task["result"]["rows"] == rows


HOSTILE = (
    b'"=HYPERLINK(""http://evil.example"")",amount,note\n'
    b"1,-3.5,@SUM(A1)\n"
    b'2,-1.5,"+1+2"\n'
    b'3,4,"-2+3"\n'
    b'4,,"\tstarts with a tab"\n'
    b'5,2,"\rcarriage, return"\n'
    b'6,1,"plain ""quoted"" text"\n'
)


def test_statistics_export_neutralises_formula_like_cells(client: httpx.Client) -> None:
    response = client.post("/csv-stats", content=HOSTILE, headers={"content-type": "text/csv"})
    task, _ = finished(client, response.json()["id"])
    assert task["status"] == "completed", task["error"]
    export = client.get(f"/csv-stats/{task['id']}/statistics.csv")
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    assert "attachment" in export.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(export.text)))
    names = [row["name"] for row in rows]
    assert names == ['\'=HYPERLINK("http://evil.example")', "amount", "note"]
    amount = rows[1]
    # numbers stay numbers, even negative ones; the JSON result says the same
    assert amount["type"] == "float" and float(amount["min"]) == -3.5 and amount["nulls"] == "1"
    assert float(amount["mean"]) == pytest.approx((-3.5 - 1.5 + 4 + 2 + 1) / 5)
    note = rows[2]
    texts = {note[f"top_{rank}"] for rank in range(1, 6)} | {note["min"], note["max"]}
    for cell in texts - {""}:  # text from the file never starts like a formula
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert {"'@SUM(A1)", "'+1+2", "'-2+3", "'\tstarts with a tab"} <= texts | {note["min"]}
    notes = ["@SUM(A1)", "+1+2", "-2+3", "\tstarts with a tab", "\rcarriage, return"]
    notes.append('plain "quoted" text')
    assert note["top_1_count"] == "1" and note["max_length"] == str(max(map(len, notes)))
    assert 'plain "quoted" text' in texts


def test_statistics_export_only_for_csv_tasks(client: httpx.Client) -> None:
    echo = client.post("/tasks", json={"name": "demo.echo", "args": {"value": 1}}).json()
    other = client.get(f"/csv-stats/{echo['id']}/statistics.csv")
    assert other.status_code == 404 and "not a CSV statistics task" in other.json()["detail"]
    missing = client.get("/csv-stats/01900000-0000-7000-8000-000000000000/statistics.csv")
    assert missing.status_code == 404
    assert client.get("/csv-stats/not-a-uuid/statistics.csv").status_code == 422


def test_statistics_export_is_tenant_scoped(
    serve: Callable[[FastAPI], LiveServer], tmp_path: Path
) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="alpha:ka,beta:kb")))
    with (
        server.client(headers={"Authorization": "Bearer ka"}) as alpha,
        server.client(headers={"Authorization": "Bearer kb"}) as beta,
    ):
        task = alpha.post("/csv-stats", content=CSV, headers={"content-type": "text/csv"}).json()
        finished(alpha, task["id"])
        assert alpha.get(f"/csv-stats/{task['id']}/statistics.csv").status_code == 200
        assert beta.get(f"/csv-stats/{task['id']}/statistics.csv").status_code == 404


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
