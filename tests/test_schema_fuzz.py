"""Schemathesis explores every documented operation from the OpenAPI schema: never a 500, and
every answer is one the schema documents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conveyor.service import create_app

from .support.live import LiveServer, service_settings


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    # no workers: generated submissions are stored and answered, not run
    server = LiveServer(create_app(service_settings(tmp), run_workers=False))
    with server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


UPLOADS = {"/images", "/csv-stats"}  # a file's bytes cannot be described by a schema


def test_documented_behaviour(api_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=50,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def explore(case: schemathesis.Case) -> None:
            # every default check: no 5xx, documented codes and bodies; random "valid" uploads
            # are rightly refused (415, or 422 when empty)
            excluded = [positive_data_acceptance] if case.path in UPLOADS else []
            case.call_and_validate(excluded_checks=excluded)

        explore()
