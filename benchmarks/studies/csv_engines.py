"""Which library computes CSV statistics fastest, in bounded memory? (the measured choice behind
`conveyor.jobs.csvstats`). Prints a table: time and peak RSS of each engine on the same file.

- duckdb: Conveyor's `csv_statistics()` itself, every statistic of the result (two passes);
- pyarrow: `pyarrow.csv.open_csv` streaming batches, merged per column: count, nulls, min, max,
  mean, std (sums of squares), string lengths; no distinct counts, quantiles or frequent values,
  which Arrow's compute functions cannot merge across batches in bounded memory;
- polars: a lazy streaming scan (`collect(engine="streaming")`) of the same subset;
- csv module: the standard library's reader and the same subset, on the first `--csv-rows` rows,
  scaled to the whole file (it is far too slow to run whole).

The subset is a lower bound of the work: an engine slower on it than DuckDB on everything loses.

Run: `pip install pyarrow polars`, then
`.venv/bin/python -m benchmarks.studies.csv_engines [--rows N]`
(generates the file as `benchmarks/csvstats.py` does; `--file` reuses one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..csvstats import generate

COLUMNS_CODE = """
NUMERIC = ["id", "amount", "quantity", "ratio"]
STRINGS = ["customer", "city", "note"]
"""

ENGINES: dict[str, str] = {
    "duckdb (Conveyor's csv_statistics, all statistics)": """
from conveyor.jobs.csvstats import csv_statistics
result = csv_statistics(Path(PATH))
rows = result["rows"]
""",
    "duckdb (subset)": """
import duckdb
con = duckdb.connect(config={"memory_limit": "256MB", "threads": 2})
exprs = ["count(*)"]
for name in NUMERIC:
    exprs += [f"count({name})", f"min({name})", f"max({name})", f"avg({name})",
              f"stddev_samp({name})"]
for name in STRINGS:
    exprs += [f"count({name})", f"min({name})", f"max({name})", f"min(length({name}))",
              f"max(length({name}))"]
rows = con.execute(f"SELECT {', '.join(exprs)} FROM read_csv('{PATH}')").fetchone()[0]
""",
    "pyarrow streaming (subset)": """
import math
import pyarrow.compute as pc
from pyarrow import csv
reader = csv.open_csv(PATH, read_options=csv.ReadOptions(block_size=16 << 20))
acc = {}
rows = 0
for batch in reader:
    rows += batch.num_rows
    for name in NUMERIC + STRINGS:
        column = batch.column(name)
        a = acc.setdefault(name, {"count": 0, "min": None, "max": None, "sum": 0.0, "sq": 0.0,
                                  "lmin": None, "lmax": None})
        a["count"] += len(column) - column.null_count
        if name in STRINGS:
            lengths = pc.min_max(pc.utf8_length(column)).as_py()
            values = pc.min_max(column).as_py()
            lo, hi = lengths["min"], lengths["max"]
            a["lmin"] = lo if a["lmin"] is None else min(a["lmin"], lo)
            a["lmax"] = hi if a["lmax"] is None else max(a["lmax"], hi)
        else:
            values = pc.min_max(column).as_py()
            floats = pc.cast(column, "double")
            a["sum"] += pc.sum(floats).as_py() or 0.0
            a["sq"] += pc.sum(pc.multiply(floats, floats)).as_py() or 0.0
        if values["min"] is not None:
            a["min"] = values["min"] if a["min"] is None else min(a["min"], values["min"])
            a["max"] = values["max"] if a["max"] is None else max(a["max"], values["max"])
""",
    "polars streaming (subset)": """
import polars as pl
frame = pl.scan_csv(PATH)
exprs = [pl.len().alias("rows")]
for name in NUMERIC:
    c = pl.col(name)
    exprs += [c.count().alias(name + "_n"), c.min().alias(name + "_min"),
              c.max().alias(name + "_max"), c.mean().alias(name + "_mean"),
              c.std().alias(name + "_std")]
for name in STRINGS:
    c = pl.col(name)
    exprs += [c.count().alias(name + "_n"), c.min().alias(name + "_min"),
              c.max().alias(name + "_max"), c.str.len_chars().min().alias(name + "_lmin"),
              c.str.len_chars().max().alias(name + "_lmax")]
result = frame.select(exprs).collect(engine="streaming")
rows = result["rows"][0]
""",
    "csv module (subset, first CSV_ROWS rows, scaled)": """
import csv, itertools, math
with open(PATH, newline="") as file:
    reader = csv.reader(file)
    header = next(reader)
    index = {name: i for i, name in enumerate(header)}
    acc = {name: [0, None, None, 0.0, 0.0] for name in NUMERIC + STRINGS}
    rows = 0
    for row in itertools.islice(reader, CSV_ROWS):
        rows += 1
        for name in NUMERIC:
            text = row[index[name]]
            if text:
                value = float(text)
                a = acc[name]
                a[0] += 1
                a[1] = value if a[1] is None or value < a[1] else a[1]
                a[2] = value if a[2] is None or value > a[2] else a[2]
                a[3] += value
                a[4] += value * value
        for name in STRINGS:
            text = row[index[name]]
            if text:
                a = acc[name]
                a[0] += 1
                a[1] = text if a[1] is None or text < a[1] else a[1]
                a[2] = text if a[2] is None or text > a[2] else a[2]
""",
}

RUNNER = """
import json, resource, sys, time
from pathlib import Path
PATH = sys.argv[1]
CSV_ROWS = int(sys.argv[2])
{columns}
started = time.perf_counter()
{body}
print(json.dumps([time.perf_counter() - started, rows,
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


def measure(body: str, path: Path, csv_rows: int) -> tuple[float, int, int]:
    code = RUNNER.format(columns=COLUMNS_CODE, body=body)
    argv = [sys.executable, "-c", code, str(path), str(csv_rows)]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    seconds, rows, peak_kb = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, rows, peak_kb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--csv-rows", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = options.file
        if path is None:
            path = Path(tmp) / "data.csv"
            generate(path, options.rows)
            os.sync()
        total_rows = sum(1 for _ in path.open("rb")) - 1
        print(f"{total_rows:,} rows, {path.stat().st_size / 1e9:.2f} GB")
        for name, body in ENGINES.items():
            try:
                seconds, rows, peak_kb = measure(body, path, options.csv_rows)
            except (ImportError, RuntimeError) as exc:
                print(f"  {name:55} failed: {str(exc).strip().splitlines()[-1]}")
                continue
            scaled = seconds * total_rows / rows if rows else seconds
            note = f" (measured {seconds:.1f} s on {rows:,} rows)" if rows < total_rows else ""
            print(f"  {name:55} {scaled:7.1f} s   peak RSS {peak_kb / 1024:6.0f} MB{note}")


if __name__ == "__main__":
    main()
