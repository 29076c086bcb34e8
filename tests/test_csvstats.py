"""CSV statistics on generated files, checked against the standard library's own computation."""

from __future__ import annotations

import csv
import gzip
import json
import random
import statistics
import subprocess
import sys
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.errors import InvalidArguments, UnsupportedMediaType
from conveyor.jobs.csvstats import CsvError, CsvOptions, csv_statistics


def generated(path: Path, rows: int = 3000, seed: int = 7) -> list[dict[str, str]]:
    """A CSV with every column type and ~1 % empty cells; returns the rows as text."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]
    records = []
    for index in range(rows):
        row = {
            "id": str(index),
            "amount": f"{rng.uniform(-1000, 1000):.3f}",
            "count": str(rng.randint(-50, 5000)),
            "ok": rng.choice(["true", "false"]),
            "day": (date(2020, 1, 1) + timedelta(days=rng.randint(0, 2000))).isoformat(),
            "at": (datetime(2021, 1, 1) + timedelta(seconds=rng.randint(0, 10**8))).isoformat(
                sep=" "
            ),
            "word": rng.choice(words) * rng.randint(1, 3),
        }
        for key in ("amount", "count", "day", "word"):
            if rng.random() < 0.01:
                row[key] = ""
        records.append(row)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return records


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {column["name"]: column for column in result["columns"]}


@pytest.fixture(scope="module")
def sample(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[dict[str, str]], dict[str, Any]]:
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    rows = generated(path)
    return path, rows, csv_statistics(path)


def test_types_counts_and_extremes(sample: Any) -> None:
    _, rows, result = sample
    columns = by_name(result)
    assert result["rows"] == len(rows) and result["encoding"] == "utf-8"
    assert result["delimiter"] == "," and result["warnings"] == []
    expected_types = {
        "id": "integer",
        "amount": "float",
        "count": "integer",
        "ok": "boolean",
        "day": "date",
        "at": "datetime",
        "word": "string",
    }
    assert {name: c["type"] for name, c in columns.items()} == expected_types
    for name in expected_types:
        values = [row[name] for row in rows if row[name] != ""]
        column = columns[name]
        assert column["count"] == len(values), name
        assert column["nulls"] == len(rows) - len(values), name
        assert column["distinct"] == len(set(values)) and column["distinct_exact"], name
    amounts = [float(row["amount"]) for row in rows if row["amount"]]
    assert columns["amount"]["min"] == pytest.approx(min(amounts))
    assert columns["amount"]["max"] == pytest.approx(max(amounts))
    days = sorted(row["day"] for row in rows if row["day"])
    assert (columns["day"]["min"], columns["day"]["max"]) == (days[0], days[-1])
    assert columns["at"]["min"] == min(row["at"] for row in rows).replace(" ", "T")


@pytest.mark.parametrize("name", ["amount", "count"])
def test_numeric_moments_and_quantiles(sample: Any, name: str) -> None:
    _, rows, result = sample
    values = [float(row[name]) for row in rows if row[name]]
    column = by_name(result)[name]
    assert column["mean"] == pytest.approx(statistics.fmean(values))
    assert column["std"] == pytest.approx(statistics.stdev(values))
    p25, median, p75 = statistics.quantiles(values, n=4, method="inclusive")
    assert column["quantiles_exact"]
    assert (column["p25"], column["median"], column["p75"]) == pytest.approx((p25, median, p75))


def test_strings_lengths_and_frequent_values(sample: Any) -> None:
    _, rows, result = sample
    words = [row["word"] for row in rows if row["word"]]
    column = by_name(result)["word"]
    assert column["min_length"] == min(map(len, words))
    assert column["max_length"] == max(map(len, words))
    expected = Counter(words).most_common()
    top = column["top_values"]
    assert len(top) == 5
    assert [item["count"] for item in top] == [count for _, count in expected[:5]]
    for item in top:
        assert Counter(words)[item["value"]] == item["count"]


def test_options_delimiter_header_columns_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "semi.csv"
    path.write_text("1;x\n2;y\n3;x\n")
    result = csv_statistics(path, CsvOptions(delimiter=";", header=False, columns=["column1"]))
    assert result["rows"] == 3 and [c["name"] for c in result["columns"]] == ["column1"]
    assert by_name(result)["column1"]["top_values"][0] == {"value": "x", "count": 2}
    packed = tmp_path / "data.csv.gz"
    packed.write_bytes(gzip.compress(b"a,b\n1,2\n3,4\n"))
    assert by_name(csv_statistics(packed))["b"]["max"] == 4
    with pytest.raises(CsvError, match="unknown columns"):
        csv_statistics(path, CsvOptions(delimiter=";", header=False, columns=["nope"]))


@pytest.mark.parametrize(
    ("content", "encoding", "value"),
    [
        pytest.param("a,b\n1,é\n".encode(), "utf-8", "é", id="utf-8"),
        pytest.param(b"\xef\xbb\xbf" + "a,b\n1,é\n".encode(), "utf-8", "é", id="utf-8-bom"),
        pytest.param("a,b\n1,é\n".encode("utf-16"), "utf-16", "é", id="utf-16-bom"),
        pytest.param("a,b\n1,é\n".encode("latin-1"), "latin-1", "é", id="latin-1"),
    ],
)
def test_encodings_are_detected_and_reported(
    tmp_path: Path, content: bytes, encoding: str, value: str
) -> None:
    path = tmp_path / "text.csv"
    path.write_bytes(content)
    result = csv_statistics(path)
    assert result["encoding"] == encoding
    assert by_name(result)["b"]["max"] == value
    assert ("Latin-1" in " ".join(result["warnings"])) == (encoding == "latin-1")


@pytest.mark.parametrize(
    ("content", "check"),
    [
        pytest.param(
            b"a,b,c\n", lambda r: r["rows"] == 0 and len(r["columns"]) == 3, id="header-only"
        ),
        pytest.param(
            b'a,b\n1,"multi\nline ""quoted"""\n2,x\n',
            lambda r: by_name(r)["b"]["min"] == 'multi\nline "quoted"',
            id="quotes-newlines",
        ),
        pytest.param(b"a,b\r1,2\r3,4", lambda r: r["rows"] == 2, id="cr-only-no-final-newline"),
        pytest.param(
            b"a,b\n1,2\n3,4", lambda r: by_name(r)["b"]["max"] == 4, id="no-final-newline"
        ),
        pytest.param(b"a,b\n1,x\x00y\n2,z\n", lambda r: r["rows"] >= 1, id="nul-bytes"),
        pytest.param(
            b"a,b\n1,2\n3\n4,5,6\n7,8\n",
            lambda r: (
                r["rows"] == 2
                and "ragged" in " ".join(r["warnings"])
                and "[3]" in " ".join(r["warnings"])
            ),
            id="ragged",
        ),
        pytest.param(
            b"a\n1\n2\nx\n3\n", lambda r: "mixes types" in " ".join(r["warnings"]), id="mixed-types"
        ),
    ],
)
def test_awkward_files_complete_with_warnings(tmp_path: Path, content: bytes, check: Any) -> None:
    path = tmp_path / "awkward.csv"
    path.write_bytes(content)
    result = csv_statistics(path)
    assert check(result), json.dumps(result)[:2000]
    json.dumps(result, allow_nan=False)  # always strict JSON


@pytest.mark.parametrize("size", [3_000_000, 100_000_000], ids=["3-mb-field", "100-mb-line"])
def test_lines_past_the_parser_limit(tmp_path: Path, size: int) -> None:
    path = tmp_path / "line.csv"
    with path.open("wb") as file:
        file.write(b"a,b\n1,")
        file.write(b"z" * size)
        file.write(b"\n2,x\n3,y\n")
    try:
        result = csv_statistics(path)
    except CsvError as exc:  # a clear error is an accepted outcome
        assert "Maximum line size" in exc.message
    else:
        assert "longer than the parser's limit" in " ".join(result["warnings"])


@pytest.mark.parametrize(
    ("content", "error"),
    [
        pytest.param(b"", InvalidArguments, id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10, UnsupportedMediaType, id="png"),
        pytest.param(bytes(range(32)) * 200, UnsupportedMediaType, id="binary"),
        pytest.param(b"\x1f\x8b\x08\x00broken", UnsupportedMediaType, id="bad-gzip"),
    ],
)
def test_refused_files(tmp_path: Path, content: bytes, error: type[Exception]) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(error):
        csv_statistics(path)


def test_non_finite_numbers_become_null_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "inf.csv"
    path.write_text("x\n1.5\ninf\n2.5\n")
    result = csv_statistics(path)
    json.dumps(result, allow_nan=False)
    assert "non-finite" in " ".join(result["warnings"])


MEMORY_PROBE = """
import resource, sys, json
from pathlib import Path
from conveyor.jobs.csvstats import csv_statistics
path = Path(sys.argv[1])
result = csv_statistics(path, memory_limit="256MB")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
memory = {key: status[key].strip() for key in ("VmHWM", "RssAnon", "RssFile") if key in status}
print(json.dumps({"size": path.stat().st_size, "rows": result["rows"], "peak_kb": peak, **memory}))
"""


@pytest.mark.timeout(300)
def test_a_200_mb_file_stays_under_the_memory_bound(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "big.csv"
    with duckdb.connect() as con:  # the file is made here; the worker process only reads it
        con.execute(
            "COPY (SELECT i AS id, i * 0.5 AS amount, 'name-' || (i % 100000) AS name, "
            "DATE '2020-01-01' + (i % 3000)::INTEGER AS day, i % 7 = 0 AS flag, "
            "CASE WHEN i % 100 = 0 THEN NULL ELSE i % 1000 END AS bucket "
            f"FROM range(5000000) t(i)) TO '{path}' (HEADER)"
        )
    output = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    assert figures["size"] > 200_000_000 and figures["rows"] == 5_000_000
    assert figures["peak_kb"] < 512 * 1024, figures
