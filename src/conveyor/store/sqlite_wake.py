"""Wake-ups between the processes that share one SQLite file, without a server.

Each process binds a Unix datagram socket in Linux's abstract namespace (no file to clean up; it
vanishes with the process) and leaves a marker file named after it in ``<database>.wake/``.
After each write transaction commits, the committing process sends one datagram to every other
marker's socket: the ids of the tasks it changed, and whether a task became due for a claim.
A receiving process wakes its dispatcher and its waiters at once instead of at their next poll.

Limits: Linux only, and only between processes that share a network namespace (the abstract
namespace belongs to it: two containers sharing the file through a volume do not hear each
other). A datagram that cannot be sent (the peer's queue is full: it has wake-ups pending
anyway; the peer is gone) is dropped. Everything keeps its polling loop as the safety net, so a
lost wake-up costs at most a poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger("conveyor.store")

QUEUED = b"Q"  # something became claimable
CHANGED = b"-"  # only task states changed
EVERYTHING = b"*"  # too many ids to list: every waiter re-reads
MAX_IDS = 512
RELIST_S = 0.2


def message(ids: Iterable[str], queued: bool) -> bytes:
    """A datagram: a kind byte, then the changed task ids (comma-separated) or ``*``."""
    listed = list(ids)
    body = EVERYTHING if len(listed) > MAX_IDS else ",".join(listed).encode()
    return (QUEUED if queued else CHANGED) + body


def parse(datagram: bytes) -> tuple[bool, list[str] | None]:
    """``(queued, ids)``; ``ids`` is None when every task may have changed."""
    queued, body = datagram[:1] == QUEUED, datagram[1:]
    if body == EVERYTHING:
        return queued, None
    return queued, [part for part in body.decode("ascii", "replace").split(",") if part]


class Doorbell:
    """This process's socket, and the other processes' sockets it rings after each commit."""

    def __init__(self, database: Path) -> None:
        self.folder = database.with_name(database.name + ".wake")
        digest = hashlib.blake2b(str(database.resolve()).encode(), digest_size=8).hexdigest()
        self._prefix = f"conveyor-{digest}-"
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._listener: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peers: list[tuple[str, bytes]] = []
        self._listed_at = -1
        self._looked_at = -RELIST_S
        self._lock = threading.Lock()

    def _address(self, name: str) -> bytes:
        return b"\0" + (self._prefix + name).encode()

    def open(self, on_ring: Callable[[bytes], None]) -> bool:
        """Listen (``on_ring(datagram)`` runs on the event loop); False where this cannot work,
        and the caller polls."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            self.folder.mkdir(exist_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            listener.bind(self._address(self.name))
            listener.setblocking(False)
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            (self.folder / self.name).touch()
        except OSError as exc:
            logger.warning("cross-process wake-ups are off, processes poll: %s", exc)
            return False
        self._loop = asyncio.get_running_loop()
        self._listener, self._sender = listener, sender
        self._loop.add_reader(listener.fileno(), self._receive, on_ring)
        return True

    def close(self) -> None:
        if self._listener is None:
            return
        assert self._loop is not None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        with self._lock:
            assert self._sender is not None
            self._sender.close()
            self._listener = self._sender = None
        with contextlib.suppress(OSError):
            (self.folder / self.name).unlink()

    def _receive(self, on_ring: Callable[[bytes], None]) -> None:
        assert self._listener is not None
        while True:
            try:
                datagram = self._listener.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                on_ring(datagram)
            except Exception:  # a subscriber's failure must not stop the wake-ups
                logger.exception("wake-up handler failed")

    def ring(self, datagram: bytes) -> None:
        """Send ``datagram`` to every other process on this file (any thread; never blocks)."""
        with self._lock:
            sender = self._sender
            if sender is None:
                return
            for name, address in self.peers():
                try:
                    sender.sendto(datagram, address)
                except BlockingIOError:
                    pass  # its queue is full: it has wake-ups to read already
                except (ConnectionRefusedError, FileNotFoundError):
                    self._forget(name)
                    self._looked_at = -RELIST_S
                except OSError as exc:
                    logger.debug("wake-up to %s not sent: %s", name, exc)

    def peers(self) -> list[tuple[str, bytes]]:
        """The other processes' sockets, listed again when the folder changed (looked at no
        more than every ``RELIST_S``: a process that just started hears the others after that
        at most, and polls meanwhile)."""
        now = time.monotonic()
        if now - self._looked_at < RELIST_S:
            return self._peers
        self._looked_at = now
        try:
            listed_at = os.stat(self.folder).st_mtime_ns
        except OSError:
            return []
        if listed_at != self._listed_at:
            self._listed_at = listed_at
            try:
                names = os.listdir(self.folder)
            except OSError:
                names = []
            self._peers = [(n, self._address(n)) for n in names if n != self.name]
        return self._peers

    def _forget(self, name: str) -> None:
        """A peer whose socket is gone: remove its marker if its process is gone too."""
        pid = name.partition("-")[0]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                return  # alive (another network namespace, or just starting): keep it
            except ProcessLookupError:
                pass
            except OSError:
                return
        with contextlib.suppress(OSError):
            (self.folder / name).unlink()
