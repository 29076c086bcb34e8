"""Pure helpers: transitions, backoff, settings, strict JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import Settings, TaskStatus
from conveyor.backoff import retry_delay_s
from conveyor.errors import ConfigurationError
from conveyor.serialization import JSONError, dumps, loads
from conveyor.status import ACTIVE, TERMINAL, can_transition

Q, R, C, F, X = (
    TaskStatus.QUEUED,
    TaskStatus.RUNNING,
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
    TaskStatus.CANCELLED,
)


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        pytest.param(Q, R, True, id="claim"),
        pytest.param(Q, X, True, id="cancel-queued"),
        pytest.param(Q, C, False, id="complete-unclaimed"),
        pytest.param(R, C, True, id="complete"),
        pytest.param(R, F, True, id="fail"),
        pytest.param(R, X, True, id="cancel-running"),
        pytest.param(R, Q, True, id="retry-or-recover"),
        pytest.param(C, Q, False, id="completed-is-final"),
        pytest.param(C, F, False, id="completed-never-fails"),
        pytest.param(F, Q, True, id="explicit-retry"),
        pytest.param(X, Q, True, id="retry-cancelled"),
        pytest.param(F, C, False, id="failed-never-completes"),
    ],
)
def test_transitions(current: TaskStatus, target: TaskStatus, allowed: bool) -> None:
    assert can_transition(current, target) is allowed


def test_named_sets() -> None:
    assert TERMINAL == {C, F, X} and ACTIVE == {Q, R} and not TERMINAL & ACTIVE


@pytest.mark.parametrize(
    ("attempt", "kwargs", "expected"),
    [
        pytest.param(1, {"base_s": 1.0, "jitter": False}, 1.0, id="first"),
        pytest.param(2, {"base_s": 1.0, "jitter": False}, 2.0, id="doubles"),
        pytest.param(5, {"base_s": 0.5, "jitter": False}, 8.0, id="base"),
        pytest.param(20, {"base_s": 1.0, "max_s": 60, "jitter": False}, 60.0, id="capped"),
        pytest.param(3, {"base_s": 1.0, "rand": lambda: 0.0}, 2.0, id="jitter-low"),
        pytest.param(3, {"base_s": 1.0, "rand": lambda: 1.0}, 4.0, id="jitter-high"),
        pytest.param(3, {"base_s": 0.0}, 0.0, id="zero-base"),
    ],
)
def test_retry_delay(attempt: int, kwargs: dict[str, object], expected: float) -> None:
    assert retry_delay_s(attempt, **kwargs) == pytest.approx(expected)  # type: ignore[arg-type]


def test_retry_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        retry_delay_s(0)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVEYOR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVEYOR_CONCURRENCY", "7")
    monkeypatch.setenv("CONVEYOR_API_KEYS", "alpha:k1, k2")
    settings = Settings()
    assert settings.concurrency == 7
    assert settings.sqlite_path() == tmp_path / "conveyor.db"
    assert settings.tenants_by_key() == {"k1": "alpha", "k2": "default"}


def test_none_disables_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_MAX_QUEUED", "none")
    assert Settings().max_queued is None


@pytest.mark.parametrize("bad", ["alpha:", ":key"])
def test_malformed_api_keys(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings(api_keys=bad).tenants_by_key()


def test_unknown_database_scheme() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        Settings(database_url="mysql://x")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[NaN]", id="nan"),
        pytest.param('{"a": Infinity}', id="infinity"),
        pytest.param("1" * 10_000, id="huge-integer"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="deep-nesting"),
        pytest.param('{"a": 1', id="truncated"),
        pytest.param("", id="empty"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_strict_json_refuses(text: str | bytes) -> None:
    with pytest.raises(JSONError):
        loads(text)


def test_dumps_refuses_non_json_values() -> None:
    assert dumps({"a": [1, 2.5, None]}) == '{"a":[1,2.5,null]}'
    with pytest.raises(JSONError):
        dumps(float("nan"))
    with pytest.raises(JSONError):
        dumps(object())


@pytest.mark.parametrize(
    ("task_name", "handler"),
    [
        pytest.param("images.transform", "transform", id="plain"),
        pytest.param("reports.async", "task_async", id="keyword"),
        pytest.param("make-thumbnail", "make_thumbnail", id="dash"),
        pytest.param("jobs.2nd", "task_2nd", id="digit-first"),
        pytest.param("x.", "task_", id="empty-tail"),
    ],
)
def test_every_task_name_makes_a_celery_handler_name(task_name: str, handler: str) -> None:
    from conveyor.engines.celery_worker import handler_name

    assert handler_name(task_name) == handler and handler.isidentifier()


UPSERT_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -5,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64 - 1,  # orjson reads integers up to 64 bits, unsigned; wider ones become floats
    1.5,
    0.0,
    "x",
    "",
    [1, 2],
    {"a": 1},
]


@pytest.mark.parametrize("kind", ["bool", "int", "float", "text", "json"])
def test_a_rows_values_taken_fast_are_the_ones_each_value_check_gives(kind: str) -> None:
    """Columns.values takes a record whose fields are of their columns' own types as they are,
    and checks any other value by value: both give what _fits gives for each value."""
    from conveyor.jobs.upsert import Columns, _fits

    kinds = [("a", kind), ("b", "int"), ("c", "text")]
    columns = Columns(kinds)
    for value in UPSERT_VALUES:
        for record in ({"a": value, "b": 1, "c": "t"}, {"a": value}, {"b": value, "c": value}):
            expected = tuple(_fits(k, record.get(name)) for name, k in kinds)
            assert columns.values(record) == expected, record
            for got, want in zip(columns.values(record), expected, strict=True):
                assert type(got) is type(want), (record, got, want)
    assert Columns([]).values({"a": 1}) == ()
    assert Columns([("a", "int")]).values({"a": 3}) == (3,)
