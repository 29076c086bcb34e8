"""A real SMTP server on loopback (aiosmtpd) whose answers the tests choose by address:

- ``defer…@`` answers ``451`` to RCPT (a temporary refusal);
- ``bounce…@`` answers ``550`` to RCPT (a permanent one);
- ``drop…@``: the first DATA for it drops the connection before answering;
- anyone else is accepted: ``250 2.0.0 Ok: queued as Q<n>``, the message kept.

Every message received is kept as ``(envelope recipients, parsed message)``; waiters are woken
on each one (no polling)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections import Counter
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .live import free_port


class Handler:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], EmailMessage]] = []
        self.data_tries: Counter[str] = Counter()
        self.rcpt_refusals: Counter[str] = Counter()
        # per message received: (over TLS, the login it was sent under or None)
        self.sessions: list[tuple[bool, str | None]] = []
        self.changed = threading.Condition()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        local = address.partition("@")[0]
        if local.startswith(("defer", "bounce")):
            self.rcpt_refusals[address] += 1
        if local.startswith("defer"):
            return "451 4.3.0 Mailbox busy, try again later"
        if local.startswith("bounce"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipients = list(envelope.rcpt_tos)
        for address in recipients:
            self.data_tries[address] += 1
            if address.startswith("drop") and self.data_tries[address] == 1:
                assert server.transport is not None
                server.transport.abort()  # gone before the reply: the client must try again
                return "451 never sent"
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        login = getattr(session.auth_data, "login", None) if session.authenticated else None
        with self.changed:
            tls = server.transport is not None and server.transport.get_extra_info("ssl_object")
            self.sessions.append((bool(tls), login and login.decode()))
            self.received.append((recipients, message))
            number = len(self.received)
            self.changed.notify_all()
        return f"250 2.0.0 Ok: queued as Q{number}"

    def wait_for(self, count: int, timeout_s: float = 30) -> list[tuple[list[str], EmailMessage]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.received) >= count, timeout_s), (
                f"{len(self.received)} messages received, {count} expected"
            )
            return list(self.received)


class _Controller(Controller):
    """Keeps every connection's protocol, to close what is left open at stop (aiosmtpd leaves
    the socket of a connection ended during STARTTLS or AUTH open)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocols: list[SMTP] = []

    def factory(self) -> SMTP:
        protocol = super().factory()
        self.protocols.append(protocol)
        return protocol

    def close_connections(self) -> None:
        async def close() -> None:
            for protocol in self.protocols:
                for transport in (protocol.transport, protocol._original_transport):
                    if isinstance(transport, asyncio.Transport):
                        transport.abort()
            loop = asyncio.get_running_loop()
            for _ in range(3):  # loop turns: the closes abort() scheduled run before the stop
                turned = loop.create_future()
                loop.call_soon(turned.set_result, None)
                await turned

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)


class SmtpServer:
    def __init__(self, **smtp_parameters: Any) -> None:
        self.handler = Handler()
        self.port = free_port()
        self.controller = _Controller(
            self.handler, hostname="127.0.0.1", port=self.port, **smtp_parameters
        )

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> SmtpServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.close_connections()
        self.controller.stop()


def message(**extra: Any) -> dict[str, Any]:
    return {
        "subject": "Hello {{ name }}",
        "text": "Hi {{ name }}, your code is {{ code }}.",
        "recipients": [{"email": "ann@example.com", "name": "Ann", "vars": {"code": "A1"}}],
    } | extra
