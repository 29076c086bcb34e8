"""A `conveyor` (or other module's) subprocess, its output collected, started on a ready line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any


class Process:
    """A `conveyor` subprocess whose output is collected; waits on a line instead of sleeping."""

    def __init__(
        self, args: list[str], env: dict[str, str], ready: str, *, module: str = "conveyor"
    ) -> None:
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._marker = ready
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(60):
            self.kill()
            raise RuntimeError("process did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            if self._marker in line:
                self._ready.set()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)
        self._reader.join(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def start_server(spawn: Any, port: int, **env: str) -> Process:
    """`conveyor serve` on ``port`` through the ``spawn`` fixture, started once it listens."""
    return spawn(
        "serve",
        "--port",
        str(port),
        "--log-level",
        "info",
        ready="Uvicorn running on",  # logged once the socket is bound
        **env,
    )


def serve_with_worker(spawn: Any, port: int) -> tuple[Process, Process]:
    """`conveyor serve` (3 tasks at once) and a `conveyor worker` (5) on one SQLite file."""
    server = start_server(spawn, port, CONVEYOR_CONCURRENCY="3")
    worker = spawn(
        "worker", "--concurrency", "5", ready="worker running", CONVEYOR_LOG_LEVEL="info"
    )
    return server, worker
