"""Schemathesis's full run over the ready service: every check (all are on by default, so the
operations of tests/support/schemathesis.toml can name their exceptions) and every phase
(examples, coverage, fuzzing, stateful). Never a 500, every answer one the OpenAPI document
lists, schema-valid input accepted and invalid input refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.service import create_app

from .support.live import LiveServer, service_settings

CONFIG = Path(__file__).parent / "support" / "schemathesis.toml"

pytestmark = pytest.mark.timeout(600)


def test_the_openapi_document_is_exact(tmp_path: Path) -> None:
    # no workers: generated submissions are stored and answered, not run
    with LiveServer(create_app(service_settings(tmp_path), run_workers=False)) as server:
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("st")),
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.url}/openapi.json",
                "--max-examples",
                "10",
                "--seed",
                "20261206",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=540,
        )
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert "No issues found" in done.stdout or " passed" in done.stdout, report
