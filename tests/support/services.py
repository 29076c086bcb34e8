"""Real servers for the tests: PostgreSQL and Redis on free loopback ports, in temporary folders.

``make test`` installs Debian's ``postgresql`` and ``redis-server`` when they are missing; the
session fixtures in ``conftest.py`` start one of each here and stop them at the end. PostgreSQL
refuses to run as root, so as root its processes run as the ``postgres`` user the package made.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

Popen = subprocess.Popen[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_logged(args: list[str], ready: str, *, timeout_s: float = 30.0, **popen: Any) -> Popen:
    """Start a server and wait until it prints ``ready``; its output keeps being read (a full
    pipe would stall it)."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    seen = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        with process.stdout:  # closed here, at the end of the output
            for line in process.stdout:
                lines.append(line)
                if ready in line:
                    seen.set()
        seen.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(timeout_s) or process.poll() is not None:
        process.kill()
        raise RuntimeError(f"{args[0]} did not start:\n" + "".join(lines[-20:]))
    return process


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if found:
        return found[-1]
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {tool} is missing: run `make test` (it installs it)")
    return path


class PostgresServer:
    """A throwaway PostgreSQL cluster (fsync off: the tests kill processes, not the machine).

    It lives in its own folder under the system's temporary directory, which the ``postgres``
    user can reach (pytest's folders are private to root).
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "conveyor"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, cwd="/", text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def start(self) -> PostgresServer:
        if not self.data.exists():
            if self._as:
                shutil.chown(self.root, "postgres")
            self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=400"
        )
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return self

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        subprocess.run(
            [
                _pg_bin("psql"),
                "-q",
                "-d",
                self.url(),
                "-c",
                f"CREATE DATABASE {name} TEMPLATE template0",
            ],
            check=True,
            capture_output=True,
        )
        return self.url(name)


class RedisServer:
    """A redis-server without persistence: a restart loses every message it held."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run `make test` (it installs it)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = start_logged(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            "Ready to accept connections",
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


class RabbitMQServer:
    """A throwaway RabbitMQ node (Debian's rabbitmq-server) on free loopback ports.

    Everything it writes lives in its own temporary folder; its Erlang distribution and port
    mapper listen on free ports too, so it does not meet another node on the machine.
    """

    BINARY = "/usr/lib/rabbitmq/bin/rabbitmq-server"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: Popen | None = None

    @classmethod
    def available(cls) -> bool:
        return Path(cls.BINARY).exists()

    def start(self) -> RabbitMQServer:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".erlang.cookie").write_text(uuid.uuid4().hex)
        (self.root / ".erlang.cookie").chmod(0o400)
        name = f"conveyor{self.port}@localhost"
        env = {
            **os.environ,
            "HOME": str(self.root),
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
        }
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.process = start_logged(
            [self.BINARY], "completed with", timeout_s=90, env=env, start_new_session=True
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)
            self.process = None

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"
