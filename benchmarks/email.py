"""The email service against a bare aiosmtplib loop, and a 100,000-recipient email.

A local SMTP sink (aiosmtpd's ``Sink`` handler, in its own process) receives everything.

1. **Throughput**: 10,000 recipients through ``POST /emails`` on ``conveyor serve`` (embedded
   engine, ``CONVEYOR_SMTP_CONNECTIONS`` connections), timed from the request to the email's
   end; against a bare loop in one process that opens the same number of aiosmtplib connections
   and sends the same number of messages on each (each message built per recipient, as the
   service does). Rounds are interleaved; the table shows medians and the ratio.
2. **A 100,000-recipient email**: the time ``POST /emails`` takes to answer ``202``; while it
   sends, ``GET /emails/{id}`` and a page of recipients filtered by status, p50/p95; the peak
   RSS (``VmHWM``) once every recipient is sent: of the server with its workers in it, and of
   the server and of a ``conveyor worker`` process when the workers run apart.

Run with `.venv/bin/python -m benchmarks.email [--recipients N] [--big N] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

from conveyor.jobs.email import Templates, build_message, new_message_id

from .support import free_port, serve

CONNECTIONS = 4
Builder = Callable[[dict[str, Any], str, str], EmailMessage]
SUBJECT = "Hello {{ name }}"
TEXT = "Hi {{ name }}, your code is {{ code }}.\n" * 20


def recipients(n: int) -> list[dict[str, Any]]:
    return [{"email": f"r{i}@example.com", "name": f"R {i}", "vars": {"code": i}} for i in range(n)]


def start_sink(port: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink"]
    return serve([*args, "-l", f"127.0.0.1:{port}"], port, dict(os.environ))


def stdlib_message(person: dict[str, Any], subject: str, text: str) -> EmailMessage:
    """A message as a hand-written loop builds it: the standard library's EmailMessage."""
    message = EmailMessage()
    message["From"] = "news@example.com"
    message["To"] = formataddr((person["name"], person["email"]))
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="example.com")
    message.set_content(text)
    return message


def conveyor_message(person: dict[str, Any], subject: str, text: str) -> EmailMessage:
    """The same message built by the service's builder."""
    return build_message(
        sender="news@example.com",
        to=person["email"],
        to_name=person["name"],
        subject=subject,
        text=text,
        html=None,
        message_id=new_message_id("example.com"),
    )


async def bare_loop(port: int, n: int, builder: Builder) -> float:
    """Messages per second: CONNECTIONS connections, n / CONNECTIONS messages on each, each
    rendered from the templates (Jinja2's sandbox, as the service does) and built by
    ``builder``."""
    templates = Templates(SUBJECT, TEXT, None)
    people = recipients(n)

    async def one_connection(share: list[dict[str, Any]]) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            for person in share:
                context = {**person["vars"], "email": person["email"], "name": person["name"]}
                subject, text, _ = templates.render(context)
                message = builder(person, subject, text or "")
                await smtp.send_message(
                    message, sender="news@example.com", recipients=[person["email"]]
                )

    started = time.perf_counter()
    await asyncio.gather(*(one_connection(people[i::CONNECTIONS]) for i in range(CONNECTIONS)))
    return n / (time.perf_counter() - started)


@contextlib.contextmanager
def service(
    sink_port: int, *, apart: bool = False
) -> Iterator[tuple[list[subprocess.Popen[bytes]], httpx.Client]]:
    """``conveyor serve`` (workers in it; with ``apart``, without them and one ``conveyor
    worker`` beside it) on a fresh data folder, sending to the sink. The processes: the server
    first."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": tmp,
            "CONVEYOR_SMTP_URL": f"smtp://127.0.0.1:{sink_port}?starttls=off",
            "CONVEYOR_SMTP_FROM": "news@example.com",
            "CONVEYOR_SMTP_CONNECTIONS": str(CONNECTIONS),
            "CONVEYOR_MAX_QUEUED": "1000000",
            "CONVEYOR_LOG_LEVEL": "warning",
        }
        args = [sys.executable, "-m", "conveyor", "serve", "--port", str(port)]
        started = [serve([*args, "--no-workers"] if apart else args, port, env)]
        if apart:
            worker = [sys.executable, "-m", "conveyor", "worker"]
            started.append(subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL))
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                yield started, client
        finally:
            for process in started:
                process.terminate()
                process.wait(30)


def body(n: int) -> dict[str, Any]:
    return {"subject": SUBJECT, "text": TEXT, "recipients": recipients(n)}


def wait_finished(client: httpx.Client, email_id: str) -> dict[str, Any]:
    while True:
        email: dict[str, Any] = client.get(f"/emails/{email_id}").json()
        if email["status"] == "finished":
            return email
        time.sleep(0.05)


def service_rate(sink_port: int, n: int) -> float:
    with service(sink_port) as (_, client):
        payload = body(n)
        started = time.perf_counter()
        created = client.post("/emails", json=payload)
        assert created.status_code == 202, created.text
        email = wait_finished(client, created.json()["id"])
        elapsed = time.perf_counter() - started
        assert email["counts"]["sent"] == n, email["counts"]
        return n / elapsed


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 2 else max(values)


def peak_rss_mb(process: subprocess.Popen[bytes]) -> float:
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024


def big_email(sink_port: int, n: int, *, apart: bool = False) -> dict[str, float]:
    with service(sink_port, apart=apart) as (processes, client):
        payload = body(n)
        started = time.perf_counter()
        created = client.post("/emails", json=payload)
        submit_s = time.perf_counter() - started
        assert created.status_code == 202, created.text
        email_id = created.json()["id"]
        gets: list[float] = []
        pages: list[float] = []
        while True:
            t0 = time.perf_counter()
            email = client.get(f"/emails/{email_id}").json()
            gets.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            page = client.get(
                f"/emails/{email_id}/recipients", params={"status": "sent", "limit": 100}
            )
            pages.append((time.perf_counter() - t0) * 1000)
            assert page.status_code == 200
            if email["status"] == "finished":
                break
            time.sleep(0.2)
        assert email["counts"]["sent"] == n, email["counts"]
        return {
            "submit_s": submit_s,
            "get_p50": statistics.median(gets),
            "get_p95": percentile(gets, 95),
            "page_p50": statistics.median(pages),
            "page_p95": percentile(pages, 95),
            "rss_mb": peak_rss_mb(processes[0]),
            "worker_rss_mb": peak_rss_mb(processes[-1]),
            "send_per_s": n / (time.perf_counter() - started),
        }


def main(n: int, big: int, rounds: int) -> None:
    sink_port = free_port()
    sink = start_sink(sink_port)
    try:
        ways: dict[str, Callable[[], float]] = {
            "bare aiosmtplib loop (stdlib EmailMessage)": lambda: asyncio.run(
                bare_loop(sink_port, n, stdlib_message)
            ),
            "bare aiosmtplib loop (Conveyor's builder)": lambda: asyncio.run(
                bare_loop(sink_port, n, conveyor_message)
            ),
            "POST /emails": lambda: service_rate(sink_port, n),
        }
        rates: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds if n else 0):  # interleaved: drift hits every way alike
            for way, run in ways.items():
                rates[way].append(run())
        if n:
            medians = {way: statistics.median(found) for way, found in rates.items() if found}
            print(f"\n{n:,} recipients, {CONNECTIONS} connections, {rounds} rounds (medians)\n")
            print("| way | messages/s | rounds | POST /emails / this way |")
            print("| --- | --- | --- | --- |")
            service = medians["POST /emails"]
            for way, found in rates.items():
                each = ", ".join(f"{x:,.0f}" for x in found)
                print(f"| {way} | {medians[way]:,.0f} | {each} | {service / medians[way]:.2f}x |")
        if big:
            together, apart = big_email(sink_port, big), big_email(sink_port, big, apart=True)
            print(f"\nOne email to {big:,} recipients\n")
            print("| figure | workers in the server | a worker process apart |")
            print("| --- | --- | --- |")

            def row(label: str, show: Callable[[dict[str, float]], str]) -> None:
                print(f"| {label} | {show(together)} | {show(apart)} |")

            row("POST /emails → 202", lambda f: f"{f['submit_s']:.2f} s")
            row(
                "GET /emails/{id} p50 / p95",
                lambda f: f"{f['get_p50']:.1f} / {f['get_p95']:.1f} ms",
            )
            row(
                "recipients page (status=sent) p50 / p95",
                lambda f: f"{f['page_p50']:.1f} / {f['page_p95']:.1f} ms",
            )
            row("server peak RSS", lambda f: f"{f['rss_mb']:.0f} MB")
            row("worker peak RSS", lambda f: f"{f['worker_rss_mb']:.0f} MB" if f is apart else "-")
            row("sent, end to end", lambda f: f"{f['send_per_s']:,.0f} messages/s")
    finally:
        sink.terminate()
        sink.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    main(args.recipients, args.big, args.rounds)
