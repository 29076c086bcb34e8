"""What the benchmarks share: free ports, servers started in a subprocess, CPU readings."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a server (``args``) and wait until ``port`` accepts connections."""
    process = subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server on port {port} did not start")


class Usage(NamedTuple):
    """One process's parent, and its threads' CPU time and run-queue wait so far (seconds)."""

    parent: int
    cpu_s: float
    waited_s: float


def processes() -> dict[int, Usage]:
    """Every process's :class:`Usage`. CPU is user and system time; the wait is the time its
    threads were ready to run while every core was busy (``schedstat``'s second field)."""
    found: dict[int, Usage] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # it ended meanwhile
            continue
        cpu_s = (int(fields[11]) + int(fields[12])) / HZ
        found[int(entry.name)] = Usage(int(fields[1]), cpu_s, _waited_s(entry))
    return found


def _waited_s(process: Path) -> float:
    """The run-queue wait of a process's threads (a thread that ended meanwhile counts 0)."""
    waited_ns = 0
    try:
        for thread in (process / "task").iterdir():
            with contextlib.suppress(OSError):
                waited_ns += int((thread / "schedstat").read_text().split()[1])
    except OSError:  # the process ended meanwhile
        pass
    return waited_ns / 1e9


def postmaster_pid(data_dir: Path) -> int:
    """The pid of the PostgreSQL server whose data folder is ``data_dir``."""
    return int((data_dir / "postmaster.pid").read_text().split()[0])
