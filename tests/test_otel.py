"""FastAPI's own OpenTelemetry in the service app (``CONVEYOR_OTEL``): ``auto`` traces requests
when OpenTelemetry is set up as the app is made and leaves FastAPI's per-request checks out when
it is not; ``on`` and ``off`` decide alone. Each case runs in a process of its own: a global
provider, once set, stays for the process's life."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from pathlib import Path
import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from conveyor import Settings
from conveyor.service import create_app
from conveyor.service.app import otel_configured
from tests.support.live import LiveServer

exporter = InMemorySpanExporter()

def set_up():
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

configured = []
if sys.argv[2] == "before":
    set_up()
configured.append(otel_configured())
app = create_app(Settings(data_dir=Path(sys.argv[1]), otel=sys.argv[3]), run_workers=False)
if sys.argv[2] == "after":
    set_up()
configured.append(otel_configured())
with LiveServer(app) as server:
    answer = httpx.post(f"{server.url}/tasks", json={"name": "demo.echo", "args": {"value": 1}})
    assert answer.status_code == 202, answer.text
spans = sorted({span.name for span in exporter.get_finished_spans()})
print(json.dumps({"configured": configured, "spans": spans}))
"""


@pytest.mark.parametrize(
    ("set_up", "mode", "traced"),
    [
        ("before", "auto", True),
        ("before", "on", True),
        ("before", "off", False),
        # set up only after the app was made: auto had decided, and FastAPI asks no more
        ("after", "auto", False),
        ("after", "on", True),  # FastAPI's own behaviour: it asks on every request
    ],
)
def test_requests_are_traced_when_opentelemetry_is_set_up(
    tmp_path: Path, set_up: str, mode: str, traced: bool
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("FASTAPI_OTEL_AUTO_CONFIGURE", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), set_up, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["configured"] == [set_up == "before", True]
    assert ("POST /tasks" in seen["spans"]) is traced, seen
