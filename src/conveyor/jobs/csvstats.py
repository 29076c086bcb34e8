"""Per-column statistics of a CSV file of any size, in bounded memory (DuckDB, streaming).

The library route: call :func:`csv_statistics` from your own task types.

    >>> stats = csv_statistics(Path("data.csv"), CsvOptions(delimiter=","))

Two passes over the file: one aggregate query computes every column's counts, extremes, moments,
approximate distinct counts (HyperLogLog), quantiles (t-digest) and frequent values; a second
counts exactly the distinct values of columns below ``exact_distinct_limit`` and the frequencies
of the frequent values. DuckDB runs with a memory limit and spills to disk past it.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import math
import tempfile
import threading
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConveyorError, InvalidArguments, UnsupportedMediaType

try:
    import duckdb
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("CSV statistics need DuckDB: pip install 'conveyor[csv]'") from exc

ColumnType = Literal["integer", "float", "boolean", "date", "datetime", "string"]
EXACT_DISTINCT_LIMIT = 100_000
MAX_LINE_BYTES = 2_000_000  # DuckDB's default; its read buffers are 16 lines long
EXACT_QUANTILE_LIMIT = 1_000_000  # rows; past this, quantiles are t-digest estimates (flagged)
TOP_VALUES = 5
_SAMPLE_BYTES = 1 << 20
_BINARY_MAGIC = (
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"GIF8",
    b"%PDF",
    b"PK\x03\x04",
    b"\x7fELF",
    b"MZ",
    b"BZh",
    b"\xfd7zXZ",
    b"RIFF",
    b"SQLite format 3",
)


class CsvError(ConveyorError):
    """The file cannot be read as CSV."""

    status_code = 422


class CsvOptions(BaseModel):
    """How to read the file; absent values are detected."""

    model_config = ConfigDict(extra="forbid")

    delimiter: Annotated[str, Field(min_length=1, max_length=1)] | None = None
    header: bool = True
    encoding: Literal["utf-8", "utf-16", "latin-1"] | None = None
    columns: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=500)]], Field(max_length=1000)]
        | None
    ) = None


def _opened(path: Path) -> Any:
    with path.open("rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    return (gzip.open(path, "rb") if compressed else path.open("rb")), compressed


def check_readable(path: Path) -> None:
    """Refuse, before any task exists, what is visibly not a CSV file (``InvalidArguments`` for
    an empty file, ``UnsupportedMediaType`` for binary content)."""
    stream, _ = _opened(path)
    try:
        with stream:
            head = stream.read(64 * 1024)
    except (OSError, EOFError) as exc:
        raise UnsupportedMediaType(f"unreadable file (bad gzip?): {exc}") from exc
    if not head:
        raise InvalidArguments(
            "the file is empty",
            details=[{"loc": ["body", "file"], "msg": "the file is empty", "type": "empty"}],
        )
    if head.startswith(_BINARY_MAGIC):
        raise UnsupportedMediaType("this is a binary file (an image, archive or program), not CSV")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return  # UTF-16 text: NUL bytes are expected
    controls = sum(1 for byte in head[:8192] if byte < 9 or 13 < byte < 32)
    if controls > len(head[:8192]) // 10:
        raise UnsupportedMediaType("this looks like a binary file, not CSV text")


def detect_encoding(path: Path) -> tuple[str, list[str]]:
    """``utf-8`` (with or without BOM), ``utf-16`` (BOM), else ``latin-1`` (with a warning)."""
    stream, _ = _opened(path)
    with stream:
        sample = stream.read(_SAMPLE_BYTES)
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16", []
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(sample, final=False)
    except UnicodeDecodeError as exc:
        return "latin-1", [f"not UTF-8 (byte {exc.start}): read as Latin-1"]
    return "utf-8", []


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_TYPES: dict[str, ColumnType] = {
    "BOOLEAN": "boolean",
    "TINYINT": "integer",
    "SMALLINT": "integer",
    "INTEGER": "integer",
    "BIGINT": "integer",
    "HUGEINT": "integer",
    "UTINYINT": "integer",
    "USMALLINT": "integer",
    "UINTEGER": "integer",
    "UBIGINT": "integer",
    "FLOAT": "float",
    "DOUBLE": "float",
    "DATE": "date",
    "TIMESTAMP": "datetime",
    "TIMESTAMP WITH TIME ZONE": "datetime",
}


def _kind(duck_type: str) -> ColumnType:
    if duck_type.startswith("DECIMAL"):
        return "float"
    return _TYPES.get(duck_type, "string")


def _json_value(value: Any, warnings: list[str], column: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        warnings.append(f"column {column!r} holds non-finite numbers (nan or inf)")
        return None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return value


Progress = Callable[[float, str], object]


def csv_statistics(
    path: Path,
    options: CsvOptions | None = None,
    *,
    memory_limit: str = "256MB",
    threads: int = 2,
    exact_distinct_limit: int = EXACT_DISTINCT_LIMIT,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Statistics of every column (or ``options.columns``) of a CSV file (plain or gzip).

    Returns ``{rows, encoding, delimiter, columns: [...], warnings: [...]}``; each column has
    ``name, type, count, nulls, distinct, distinct_exact, min, max`` and, for numbers, ``mean,
    std, median, p25, p75`` (quantiles are t-digest estimates); for strings ``min_length,
    max_length, top_values`` (the 5 most frequent, with exact counts).
    """
    options = options or CsvOptions()
    check_readable(path)
    warnings: list[str] = []
    encoding: str | None = options.encoding
    if encoding is None:
        encoding, found = detect_encoding(path)
        warnings += found
    with tempfile.TemporaryDirectory(prefix="conveyor-csv-") as spill:
        con = duckdb.connect(
            config={
                "memory_limit": memory_limit,
                "threads": threads,
                "temp_directory": spill,
                "preserve_insertion_order": False,
                # freed memory goes back to the system as the query runs, not when it ends:
                # a 244 MB file peaked at 226-286 MB with these, 261-324 MB without
                "allocator_flush_threshold": "16MB",
                "allocator_background_threads": True,
            }
        )
        # progress is tracked (for query_progress) but never drawn on the terminal
        con.execute("SET enable_progress_bar = true")
        con.execute("SET enable_progress_bar_print = false")
        try:
            return _analyse(
                con, path, options, encoding, warnings, exact_distinct_limit, on_progress
            )
        except duckdb.Error as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "exceeded" in line), lines[0] if lines else "")
            raise CsvError(f"cannot read the file as CSV: {reason}") from exc
        finally:
            con.close()


def _analyse(
    con: Any,
    path: Path,
    options: CsvOptions,
    encoding: str,
    warnings: list[str],
    exact_distinct_limit: int,
    on_progress: Progress | None,
) -> dict[str, Any]:
    stream, compressed = _opened(path)
    stream.close()
    # the compression is named from the bytes: an upload's name says nothing
    common = (
        f"encoding={_quote(encoding)}, max_line_size={MAX_LINE_BYTES}, "
        f"compression={_quote('gzip' if compressed else 'none')}"
    )
    reader = (
        f"read_csv({_quote(str(path))}, header={str(options.header).lower()}, {common}, "
        "store_rejects=true, ignore_errors=true, sample_size=20480, null_padding=false"
        + (f", delim={_quote(options.delimiter)}" if options.delimiter else "")
        + ")"
    )
    sniffed = con.execute(
        f"SELECT Delimiter FROM sniff_csv({_quote(str(path))}, {common})"
    ).fetchall()
    described = con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()
    delimiter = options.delimiter or (sniffed[0][0] if sniffed else ",")
    available = [row[0] for row in described]
    if options.columns:
        missing = [name for name in options.columns if name not in available]
        if missing:
            raise CsvError(f"unknown columns {missing}; the file has {available}")
        chosen = [row for row in described if row[0] in options.columns]
    else:
        chosen = described
    columns = [(name, _kind(duck_type)) for name, duck_type, *_ in chosen]
    selects = ["count(*)"]
    for name, kind in columns:
        c = _ident(name)
        selects += [f"count({c})", f"approx_count_distinct({c})", f"min({c})", f"max({c})"]
        if kind in ("integer", "float"):
            selects += [
                f"avg({c})",
                f"stddev_samp({c})",
                f"approx_quantile({c}, [0.25, 0.5, 0.75])",
            ]
        elif kind == "string":
            selects += [
                f"min(length({c}))",
                f"max(length({c}))",
                f"approx_top_k({c}, {TOP_VALUES})",
                f"count(TRY_CAST({c} AS DOUBLE))",
            ]
    first = _run(con, f"SELECT {', '.join(selects)} FROM {reader}", on_progress, 0, 70, "reading")
    rows = first[0]
    results: list[dict[str, Any]] = []
    position = 1
    for name, kind in columns:
        count, approx_distinct, low, high = first[position : position + 4]
        position += 4
        column: dict[str, Any] = {
            "name": name,
            "type": kind,
            "count": count,
            "nulls": rows - count,
            "distinct": approx_distinct,
            "distinct_exact": False,
            "min": _json_value(low, warnings, name),
            "max": _json_value(high, warnings, name),
        }
        if kind in ("integer", "float"):
            mean, std, quantiles = first[position : position + 3]
            position += 3
            p25, median, p75 = quantiles if quantiles else (None, None, None)
            column |= {
                "mean": _json_value(mean, warnings, name),
                "std": _json_value(std, warnings, name),
                "median": _json_value(median, warnings, name),
                "p25": _json_value(p25, warnings, name),
                "p75": _json_value(p75, warnings, name),
                "quantiles_exact": False,
            }
        elif kind == "string":
            min_length, max_length, top, numeric = first[position : position + 4]
            position += 4
            column |= {"min_length": min_length, "max_length": max_length, "top_values": top or []}
            if 0 < numeric < count:
                warnings.append(
                    f"column {name!r} mixes types: {numeric} of {count} values are numbers"
                )
        results.append(column)
    warnings += _rejects(con)  # each scan of the file replaces DuckDB's rejects table
    _exact_pass(con, reader, results, rows, exact_distinct_limit, warnings, on_progress)
    if on_progress is not None:
        on_progress(100, "done")
    return {
        "rows": rows,
        "encoding": encoding,
        "delimiter": delimiter,
        "header": options.header,
        "columns": results,
        "warnings": list(dict.fromkeys(warnings)),
    }


def _exact_pass(
    con: Any,
    reader: str,
    results: list[dict[str, Any]],
    rows: int,
    limit: int,
    warnings: list[str],
    on_progress: Progress | None,
) -> None:
    """Exact distinct counts and frequencies below ``limit`` distinct values (a histogram of at
    most ``limit`` entries per column), exact quantiles up to ``EXACT_QUANTILE_LIMIT`` rows."""
    selects: list[str] = []
    plan: list[tuple[dict[str, Any], str, Any]] = []
    for column in results:
        c = _ident(column["name"])
        small = column["distinct"] <= limit
        if small and "top_values" in column:
            selects.append(f"histogram({c})")
            plan.append((column, "histogram", None))
        elif small:
            selects.append(f"count(DISTINCT {c})")
            plan.append((column, "distinct", None))
        else:
            for value in column.get("top_values", []):
                selects.append(f"count(*) FILTER (WHERE {c} = {_quote(str(value))})")
                plan.append((column, "top", value))
        if "median" in column and rows <= EXACT_QUANTILE_LIMIT:
            selects.append(f"quantile_cont({c}, [0.25, 0.5, 0.75])")
            plan.append((column, "quantiles", None))
    if not selects:
        return
    values = _run(
        con, f"SELECT {', '.join(selects)} FROM {reader}", on_progress, 70, 98, "counting"
    )
    tops: dict[str, list[dict[str, Any]]] = {}
    for (column, what, value), result in zip(plan, values, strict=True):
        if what == "distinct":
            column["distinct"], column["distinct_exact"] = result, True
        elif what == "histogram":
            counts: dict[Any, int] = dict(result or {})
            column["distinct"], column["distinct_exact"] = len(counts), True
            ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
            tops[column["name"]] = [{"value": v, "count": n} for v, n in ranked[:TOP_VALUES]]
        elif what == "quantiles":
            if result:
                quantiles = [_json_value(float(v), warnings, column["name"]) for v in result]
                column["p25"], column["median"], column["p75"] = quantiles
                column["quantiles_exact"] = True
        else:
            tops.setdefault(column["name"], []).append({"value": value, "count": result})
    for column in results:
        if "top_values" in column:
            ranked_top = sorted(tops.get(column["name"], []), key=lambda item: -item["count"])
            column["top_values"] = ranked_top


EXPORT_FIELDS = (
    "name",
    "type",
    "count",
    "nulls",
    "distinct",
    "distinct_exact",
    "min",
    "max",
    "mean",
    "std",
    "median",
    "p25",
    "p75",
    "quantiles_exact",
    "min_length",
    "max_length",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(value: Any) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula.

    Text from the file (column names, string extremes, frequent values) that starts with ``=``,
    ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``; numbers the statistics
    computed are written as numbers (a negative mean stays a number).
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def statistics_csv(result: dict[str, Any]) -> str:
    """The statistics of :func:`csv_statistics` as CSV text: a row per column of the file, with
    ``top_1`` … ``top_5`` and their counts; every cell neutralised (see :func:`neutralised`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    tops = [f"top_{rank}{suffix}" for rank in range(1, TOP_VALUES + 1) for suffix in ("", "_count")]
    writer.writerow([*EXPORT_FIELDS, *tops])
    for column in result.get("columns", []):
        row = [neutralised(column.get(field)) for field in EXPORT_FIELDS]
        for top in column.get("top_values", [])[:TOP_VALUES]:
            row += [neutralised(top.get("value")), neutralised(top.get("count"))]
        row += [""] * (len(EXPORT_FIELDS) + len(tops) - len(row))
        writer.writerow(row)
    return out.getvalue()


def _rejects(con: Any) -> list[str]:
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'reject_errors'"
    ).fetchone()
    if not exists or not exists[0]:  # DuckDB makes the table only when a row was rejected
        return []
    rows = con.execute(
        "SELECT error_type, count(*), list(line ORDER BY line)[1:5] FROM reject_errors "
        "GROUP BY error_type ORDER BY error_type"
    ).fetchall()
    names = {
        "MISSING COLUMNS": "ragged rows (too few fields)",
        "TOO MANY COLUMNS": "ragged rows (too many fields)",
        "INVALID UNICODE": "undecodable bytes",
        "LINE SIZE OVER MAXIMUM": "lines longer than the parser's limit",
        "CAST": "values that do not match the column's type",
        "UNQUOTED VALUE": "malformed quoting",
    }
    return [
        f"{count} {names.get(kind, kind.lower())} skipped, first at lines {lines}"
        for kind, count, lines in rows
    ]


def _run(
    con: Any, sql: str, on_progress: Progress | None, start: float, end: float, label: str
) -> tuple[Any, ...]:
    """Run one query; while it runs, report DuckDB's progress scaled into [start, end]."""
    done = threading.Event()
    if on_progress is not None:

        def report() -> None:
            while not done.wait(0.2):
                fraction = con.query_progress()
                if fraction is not None and fraction >= 0:
                    on_progress(start + (end - start) * min(fraction, 100) / 100, label)

        watcher = threading.Thread(target=report, daemon=True)
        watcher.start()
    try:
        rows = con.execute(sql).fetchall()  # fetchone() leaves the scan unfinished (no rejects)
        row = rows[0] if rows else None
    finally:
        done.set()
    assert row is not None
    result: tuple[Any, ...] = row
    return result
