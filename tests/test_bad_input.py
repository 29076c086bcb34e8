"""Hostile and malformed input on every route: a 4xx with a JSON body naming the problem."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.service import create_app

from .support.live import LiveServer, follow, service_settings

UNKNOWN = "00000000-0000-4000-8000-000000000000"
JSON = "application/json"
TASK_ROUTES = [
    ("GET", "/tasks/{id}"),
    ("POST", "/tasks/{id}/cancel"),
    ("POST", "/tasks/{id}/retry"),
    ("GET", "/tasks/{id}/events"),
    ("GET", "/tasks/{id}/result"),
    ("DELETE", "/tasks/{id}"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp: Path = tmp_path_factory.mktemp("bad-input")
    server = LiveServer(create_app(service_settings(tmp, max_body_bytes=65_536)))
    with server, server.client() as c:
        yield c


def post_raw(client: httpx.Client, body: bytes | str, content_type: str | None = JSON) -> Any:
    headers = {"content-type": content_type} if content_type else {}
    return client.post("/tasks", content=body, headers=headers)


def assert_clear_4xx(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    text = str(detail).lower()
    for word in words:
        assert word.lower() in text, (word, text[:500])


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        pytest.param('{"name": "demo.echo", "args": {', 422, ["json"], id="truncated"),
        pytest.param("{'name': 'demo.echo'}", 422, ["json"], id="malformed"),
        pytest.param("", 422, ["body"], id="empty"),
        pytest.param("null", 422, ["body"], id="null"),
        pytest.param("[1, 2]", 422, ["body"], id="array"),
        pytest.param('{"name": "demo.echo", "args": {"value": NaN}}', 422, ["json"], id="nan"),
        pytest.param('{"name": "demo.echo", "args": {"value": -Infinity}}', 422, [], id="inf"),
        pytest.param(
            '{"name": "demo.echo", "args": {"value": ' + "9" * 10_000 + "}}",
            422,
            ["json"],
            id="10k-digit-integer",
        ),
        pytest.param(
            '{"name": "demo.echo", "args": {"value": ' + "[" * 30_000 + "]" * 30_000 + "}}",
            422,
            ["json"],
            id="deep-nesting",
        ),
        pytest.param('{"name": 5}', 422, ["name"], id="name-not-string"),
        pytest.param('{"name": ""}', 422, ["name"], id="name-empty"),
        pytest.param('{"name": "demo.echo", "args": [1]}', 422, ["args"], id="args-not-object"),
        pytest.param(
            '{"name": "demo.nope", "args": {}}', 422, ["unknown", "demo.nope"], id="unknown-task"
        ),
        pytest.param(
            '{"name": "demo.sleep", "args": {"seconds": "abc"}}',
            422,
            ["seconds"],
            id="wrong-arg-type",
        ),
        pytest.param(
            '{"name": "demo.sleep", "args": {}}', 422, ["seconds", "missing"], id="missing-arg"
        ),
        pytest.param(
            '{"name": "demo.sleep", "args": {"seconds": 1, "x": 2}}', 422, ["x"], id="extra-arg"
        ),
        pytest.param(
            '{"name": "demo.sleep", "args": {"seconds": -1}}',
            422,
            ["seconds"],
            id="negative-seconds",
        ),
        pytest.param('{"name": "demo.cpu", "args": {"n": 1e300}}', 422, ["n"], id="huge-float"),
        pytest.param(
            '{"name": "demo.echo", "priority": "high"}', 422, ["priority"], id="priority-not-int"
        ),
        pytest.param('{"name": "demo.echo", "delay_s": -5}', 422, ["delay_s"], id="negative-delay"),
        pytest.param('{"name": "demo.echo", "delay_s": 1e308}', 422, ["delay_s"], id="huge-delay"),
        pytest.param(
            '{"name": "demo.echo", "timeout_s": 0}', 422, ["timeout_s"], id="zero-timeout"
        ),
        pytest.param('{"name": "demo.echo", "bogus": 1}', 422, ["bogus"], id="unknown-field"),
        pytest.param('{"name": "demo.echo", "delay_s": false}', 422, ["delay_s"], id="bool-delay"),
        pytest.param(
            '{"name": "demo.echo", "priority": "3"}', 422, ["priority"], id="text-priority"
        ),
        pytest.param('{"name": "demo.cpu", "args": {"n": true}}', 422, ["n"], id="bool-argument"),
        pytest.param('{"name": "demo.cpu", "args": {"n": "12"}}', 422, ["n"], id="text-argument"),
        pytest.param(b'{"name": "demo.echo\xff"}', 422, ["json"], id="invalid-utf8"),
        pytest.param("\x00\x01\x02", 422, ["json"], id="binary"),
    ],
)
def test_submit_bad_bodies(
    client: httpx.Client, body: str | bytes, status: int, words: list[str]
) -> None:
    assert_clear_4xx(post_raw(client, body), status, *words)


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        pytest.param("text/plain", 415, id="text-plain"),
        pytest.param(None, 415, id="missing"),
        pytest.param("application/x-www-form-urlencoded", 415, id="form"),
        pytest.param("multipart/form-data; boundary=x", 415, id="multipart"),
    ],
)
def test_submit_wrong_content_type(
    client: httpx.Client, content_type: str | None, status: int
) -> None:
    response = post_raw(client, '{"name": "demo.echo"}', content_type)
    assert_clear_4xx(response, status, "application/json")


def test_integers_past_64_bits_are_answered_and_kept(client: httpx.Client) -> None:
    """Valid JSON that orjson refuses to write (found by schemathesis): stored and echoed."""
    body = '{"name": "demo.echo", "args": {"value": {"big": 86234331010861334528}}}'
    response = post_raw(client, body)
    assert response.status_code == 202, response.text
    assert response.json()["args"]["value"]["big"] == 86234331010861334528
    task, _ = follow(client, response.json()["id"])
    assert task["status"] == "completed"
    assert task["result"] == {"big": 86234331010861334528}
    listed = client.get("/tasks").json()
    assert any(t["id"] == task["id"] for t in listed["items"])


def test_oversized_body(client: httpx.Client) -> None:
    body = '{"name": "demo.echo", "args": {"value": "' + "x" * 100_000 + '"}}'
    assert_clear_4xx(post_raw(client, body), 413, "exceeds")


def test_oversized_body_streamed_without_length(client: httpx.Client) -> None:
    def chunks() -> Any:
        yield b'{"name": "demo.echo", "args": {"value": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}}'

    response = client.post("/tasks", content=chunks(), headers={"content-type": JSON})
    assert_clear_4xx(response, 413, "exceeds")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(b"x" * 201, id="too-long"),
        pytest.param(b"a b", id="space"),
        pytest.param("é".encode(), id="non-ascii"),
    ],
)
def test_bad_idempotency_keys(client: httpx.Client, key: bytes) -> None:
    response = client.post("/tasks", json={"name": "demo.echo"}, headers={"Idempotency-Key": key})
    assert_clear_4xx(response, 422, "idempotency")


def test_control_characters_in_headers_are_refused_by_the_server(client: httpx.Client) -> None:
    # uvicorn refuses the request line itself (400) before the app sees it; the app stays up.
    response = client.post(
        "/tasks", json={"name": "demo.echo"}, headers={"Idempotency-Key": b"\x01"}
    )
    assert response.status_code == 400
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("method", "path"), TASK_ROUTES)
@pytest.mark.parametrize(
    ("task_id", "status"),
    [
        pytest.param(UNKNOWN, 404, id="unknown"),
        pytest.param("abc", 422, id="malformed"),
        pytest.param("1' OR '1'='1", 422, id="injection"),
        pytest.param("0" * 5000, 422, id="huge"),
    ],
)
def test_task_routes_with_bad_ids(
    client: httpx.Client, method: str, path: str, task_id: str, status: int
) -> None:
    response = client.request(method, path.format(id=task_id))
    assert_clear_4xx(response, status)


@pytest.mark.parametrize(
    ("params", "word"),
    [
        pytest.param({"limit": 0}, "limit", id="limit-zero"),
        pytest.param({"limit": 10_000}, "limit", id="limit-huge"),
        pytest.param({"limit": "many"}, "limit", id="limit-text"),
        pytest.param({"cursor": "abc"}, "cursor", id="cursor-text"),
        pytest.param({"cursor": "9" * 100}, "cursor", id="cursor-huge"),
        pytest.param({"cursor": "9" * 20}, "cursor", id="cursor-past-64-bits"),
        pytest.param({"status": "done"}, "status", id="status-unknown"),
        pytest.param({"name": "x" * 1000}, "name", id="name-huge"),
    ],
)
def test_list_bad_parameters(client: httpx.Client, params: dict[str, Any], word: str) -> None:
    assert_clear_4xx(client.get("/tasks", params=params), 422, word)


def test_service_stays_up_after_abuse(client: httpx.Client) -> None:
    ok = client.post("/tasks", json={"name": "demo.echo", "args": {"value": 1}})
    assert ok.status_code == 202
    assert client.get("/health").json()["status"] == "ok"


def test_auth_header_garbage(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> None:
    server = serve(create_app(service_settings(tmp_path, api_keys="t:secret")))
    with server.client() as c:
        for header in ["Bearer", "Basic secret", "Bearer secret extra", "Bearer " + "x" * 5000]:
            response = c.get("/tasks", headers={"Authorization": header})
            assert_clear_4xx(response, 401, "api key")
            assert response.headers["www-authenticate"] == "Bearer"


def test_an_integral_float_is_an_integer_as_json_schema_says(client: httpx.Client) -> None:
    response = post_raw(client, '{"name": "demo.cpu", "args": {"n": 10.0}, "priority": 2.0}')
    assert response.status_code == 202, response.text
    assert response.json()["args"] == {"n": 10} and response.json()["priority"] == 2


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        pytest.param("/tasks", "GET, POST", id="list-and-submit"),
        pytest.param(
            "/tasks/00000000-0000-0000-0000-000000000000", "GET, DELETE", id="get-and-delete"
        ),
        pytest.param("/health", "GET", id="one-method"),
    ],
)
def test_method_not_allowed_names_every_method_of_the_path(
    client: httpx.Client, path: str, allowed: str
) -> None:
    response = client.request("PATCH", path)
    assert response.status_code == 405 and response.headers["allow"] == allowed
