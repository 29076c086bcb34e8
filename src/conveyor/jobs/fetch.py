"""Fetching a paginated JSON API, page by page, within limits (the ingestion's fetcher).

:func:`pages` yields one :class:`Page` (its records and size) per response. Each request is
retried with backoff and jitter on a connect error, ``429`` and ``502/503/504``, honouring
``Retry-After`` (seconds or an HTTP date) between a floor and a cap; past the cap the run fails
as rate-limited rather than sleeping for hours. A response is read as it streams and stopped at
``max_response_bytes`` of decoded bytes (a gzip bomb stops there too); an HTML page served with
``200``, a body that is not JSON, a pagination that comes back to a URL already fetched: each
fails the run with an error saying so. Connections go through the SSRF guard
(:mod:`conveyor.jobs.netguard`) unless the caller gives its own client.
"""

from __future__ import annotations

import email.utils
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
import orjson

from .netguard import Refused

RETRY_STATUSES = frozenset({429, 502, 503, 504})
PaginationType = Literal["none", "page_number", "offset", "cursor", "link_header", "next_url"]


class FetchError(Exception):
    """The run cannot go on: the message says what the server did (never a header's value)."""


class RateLimited(FetchError):
    """The server asked to wait longer than the cap."""


@dataclass(frozen=True, slots=True)
class Pagination:
    """How the next page is asked for.

    - ``page_number``: ``param`` (``page``) counts from ``start`` (1) until a page is empty;
    - ``offset``: ``param`` (``offset``) moves by the records received, ``limit_param`` and
      ``page_size`` ask for a page's size; it stops at a short page;
    - ``cursor``: the response's ``cursor_path`` (``next_cursor``) is sent back as ``param``
      (``cursor``) until it is empty;
    - ``link_header``: the ``Link`` header's ``rel="next"`` (RFC 8288);
    - ``next_url``: the response's ``next_path`` (``next``) is the next page's URL.
    """

    type: PaginationType = "none"
    param: str | None = None
    start: int = 1
    limit_param: str | None = None
    page_size: int | None = None
    cursor_path: str = "next_cursor"
    next_path: str = "next"


@dataclass(frozen=True, slots=True)
class Limits:
    max_pages: int = 10_000
    max_response_bytes: int = 50 * 1_048_576
    timeout_s: float = 30.0
    rate_per_s: float | None = None
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    retry_after_floor_s: float = 0.05
    retry_after_cap_s: float = 120.0


@dataclass(slots=True)
class Page:
    number: int
    url: str
    records: list[Any]
    body: Any
    size: int
    digest: str = ""  # of the body's bytes: the same body, the same records
    known: bool = False  # its bytes are those of a page already written: not parsed again


# Paginations whose next page does not depend on the body's fields, only on whether a page
# had records: a page known by its digest need not be parsed to go on.
BLIND = frozenset({"none", "page_number", "link_header"})


@dataclass(slots=True)
class FetchStats:
    pages: int = 0
    bytes: int = 0
    retries: int = 0
    truncated: bool = False  # stopped at max_pages with more to fetch
    statuses: dict[int, int] = field(default_factory=dict)


def dig(body: Any, path: str | None) -> Any:
    """``body`` at a dotted ``path`` (``data.items``; empty: the body itself); None if absent."""
    node = body
    for part in (path or "").split("."):
        if not part:
            continue
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (None: unreadable)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(moment.timestamp() - (time.time() if now is None else now), 0.0)


def backoff_s(attempt: int, limits: Limits) -> float:
    """Exponential backoff with full jitter for retry ``attempt`` (1, 2, …)."""
    ceiling = min(limits.backoff_s * 2 ** (attempt - 1), limits.max_backoff_s)
    return random.uniform(ceiling / 2, ceiling)


async def pages(
    client: httpx.AsyncClient,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    records_path: str | None = None,
    pagination: Pagination = Pagination(),
    limits: Limits = Limits(),
    stats: FetchStats | None = None,
    on_retry: Callable[[str], None] | None = None,
    known: Mapping[int, tuple[str, int]] | None = None,
) -> AsyncIterator[Page]:
    """Every page of the API at ``url``, in order. ``known``: page number → the digest of the
    body last written for it and how many records it had; with a pagination in :data:`BLIND`,
    such a page comes again unparsed (``known``, no records)."""
    stats = stats if stats is not None else FetchStats()
    query: dict[str, str] = dict(params or {})
    if pagination.type == "page_number":
        query[pagination.param or "page"] = str(pagination.start)
    if pagination.type == "offset":
        query[pagination.param or "offset"] = "0"
    if pagination.page_size is not None and pagination.limit_param:
        query[pagination.limit_param] = str(pagination.page_size)
    request = client.build_request("GET", url, params=query, headers=dict(headers or {}))
    seen: set[str] = set()
    last_start = 0.0
    number = 0
    while True:
        if number >= limits.max_pages:
            stats.truncated = True
            return
        address = str(request.url)
        if address in seen:
            raise FetchError(f"pagination came back to a page already fetched: {_shown(address)}")
        seen.add(address)
        if limits.rate_per_s:
            wait = last_start + 1 / limits.rate_per_s - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
        last_start = time.monotonic()
        response, raw = await _get(client, request, limits, stats, on_retry)
        number += 1
        digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
        last = (known or {}).get(number)
        if pagination.type in BLIND and last is not None and last[0] == digest:
            stats.pages += 1
            yield Page(number, _shown(address), [], None, len(raw), digest, known=True)
            count, body = last[1], None
        else:
            body = _json(response, raw, number)
            records = dig(body, records_path)
            if records is None:
                records = []
            if not isinstance(records, list):
                where = records_path or "the response"
                raise FetchError(f"page {number}: {where} is not a list of records")
            stats.pages += 1
            yield Page(number, _shown(address), records, body, len(raw), digest)
            count = len(records)
        following = _next(request, response, body, count, pagination, set(headers or {}))
        if following is None:
            return
        request = following


def _shown(address: str) -> str:
    """A URL for messages: without its query (which may hold a token)."""
    return address.split("?", 1)[0]


async def _get(
    client: httpx.AsyncClient,
    request: httpx.Request,
    limits: Limits,
    stats: FetchStats,
    on_retry: Callable[[str], None] | None,
) -> tuple[httpx.Response, bytes]:
    attempt = 0
    while True:
        attempt += 1
        reason: str
        wait: float | None = None
        try:
            response = await client.send(request, stream=True)
        except Refused as exc:
            raise FetchError(str(exc)) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout) as exc:
            reason = f"{type(exc).__name__} on {_shown(str(request.url))}"
        else:
            stats.statuses[response.status_code] = stats.statuses.get(response.status_code, 0) + 1
            if response.status_code not in RETRY_STATUSES:
                try:
                    if response.status_code >= 400:
                        await response.aclose()
                        raise FetchError(
                            f"{_shown(str(request.url))} answered {response.status_code} "
                            f"{response.reason_phrase}"
                        )
                    raw = await _read(response, limits.max_response_bytes)
                finally:
                    await response.aclose()
                stats.bytes += len(raw)
                return response, raw
            await response.aclose()
            reason = f"{response.status_code} {response.reason_phrase}"
            asked = retry_after_s(response.headers.get("retry-after"))
            if asked is not None:
                if asked > limits.retry_after_cap_s:
                    raise RateLimited(
                        f"rate-limited: the server asked to wait {asked:.0f} s "
                        f"(more than {limits.retry_after_cap_s:.0f} s)"
                    )
                wait = max(asked, limits.retry_after_floor_s)
        if attempt > limits.retries:
            raise FetchError(f"gave up after {attempt} tries: {reason}")
        stats.retries += 1
        if on_retry is not None:
            on_retry(reason)
        await anyio.sleep(wait if wait is not None else backoff_s(attempt, limits))


async def _read(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, stopped as soon as it passes ``limit`` bytes."""
    declared = response.headers.get("content-length")
    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
    if declared and declared.isdigit() and not encoded and int(declared) > limit:
        raise FetchError(f"the response is {declared} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise FetchError(f"the response passed the {limit}-byte limit while it streamed")
            chunks.append(chunk)
    except httpx.DecodingError as exc:
        raise FetchError(f"the response could not be decoded: {exc}") from None
    except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
        raise FetchError(f"the response was cut short: {type(exc).__name__}") from None
    return b"".join(chunks)


def _json(response: httpx.Response, raw: bytes, number: int) -> Any:
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind in ("text/html", "application/xhtml+xml") or raw.lstrip()[:1] == b"<":
        raise FetchError(
            f"page {number}: the server sent an HTML page ({kind or 'no content type'}) "
            "instead of JSON"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FetchError(f"page {number}: the response is not valid JSON ({exc})") from None


def _next(
    request: httpx.Request,
    response: httpx.Response,
    body: Any,
    count: int,
    pagination: Pagination,
    secret: set[str],
) -> httpx.Request | None:
    """The request for the page after this one (``count``: its records), or None."""
    kind = pagination.type
    if kind == "none" or (kind in ("page_number", "offset") and not count):
        return None
    url = request.url
    if kind == "page_number":
        name = pagination.param or "page"
        current = int(url.params.get(name, str(pagination.start)))
        return _with(request, url.copy_set_param(name, str(current + 1)), secret)
    if kind == "offset":
        if pagination.page_size is not None and count < pagination.page_size:
            return None
        name = pagination.param or "offset"
        current = int(url.params.get(name, "0"))
        return _with(request, url.copy_set_param(name, str(current + count)), secret)
    if kind == "cursor":
        token = dig(body, pagination.cursor_path)
        if token in (None, "", False):
            return None
        return _with(request, url.copy_set_param(pagination.param or "cursor", str(token)), secret)
    if kind == "link_header":
        target = response.links.get("next", {}).get("url")
    else:
        target = dig(body, pagination.next_path)
    if not isinstance(target, str) or not target:
        return None
    return _with(request, url.join(target), secret)


def _with(request: httpx.Request, url: httpx.URL, secret: set[str]) -> httpx.Request:
    """The request for the next page; on another host (or scheme) without the source's own
    headers, which may be credentials meant for the first."""
    headers = httpx.Headers(request.headers)
    del headers["host"]
    if (url.scheme, url.host, url.port) != (request.url.scheme, request.url.host, request.url.port):
        for name in [*secret, "authorization", "cookie"]:
            if name in headers:
                del headers[name]
    return httpx.Request("GET", url, headers=headers)
