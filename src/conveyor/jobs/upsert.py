"""Upserting JSON records into a table of a local database (SQLAlchemy Core, SQLite or
PostgreSQL), one transaction per page, with the cursor in the same transaction.

The table has one column per top-level field (declared with their kinds, or typed from the first
value seen and added when a new field appears), the raw record as JSON beside them (``_raw``, the
truth: a value that does not fit its column's type is kept there only), a content hash (``_hash``)
so an unchanged record is not rewritten, and ``_row_id`` for reading it back in order. The primary
key fields have a unique index and are the upsert's conflict target; within a page, the last
record with a key wins.

The cursor (the highest value of a record field such as ``updated_at``) moves in two steps: each
page's transaction records the highest value it committed as ``pending_cursor``; the run's end
makes it the ``cursor`` the next run starts from. A run cut short (a crash, a failed page)
leaves ``cursor`` where the last complete run put it, so the next run fetches again what was
not finished (the upsert makes that harmless) and the cursor is never ahead of the data.
"""

from __future__ import annotations

import hashlib
import operator
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

RESERVED = ("_row_id", "_raw", "_hash", "_ingested_at")
_INT_LOW, _INT_HIGH = -(2**63), 2**63  # what an integer column holds
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_REJECTS = 100
STATE = "conveyor_ingest_state"
PAGES = "conveyor_ingest_pages"
Order = list[int] | Literal["named"] | None


def state_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        STATE,
        metadata,
        sa.Column("source_id", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.Text),
        sa.Column("pending_cursor", sa.Text),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def page_table(metadata: sa.MetaData) -> sa.Table:
    """Each source's pages as last written: the digest of the page's body, its records with a
    key and those rejected. A page whose body has the same digest is not read again."""
    return sa.Table(
        PAGES,
        metadata,
        sa.Column("source_id", sa.String(64), primary_key=True),
        sa.Column("page", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.Column("keyed", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
    )


@dataclass(slots=True)
class PageOutcome:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    same_page: bool = False  # the body was the one last written: not read again


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT_LOW <= value < _INT_HIGH else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "text"
    return "json"


_TYPES: dict[str, sa.types.TypeEngine[Any]] = {
    "bool": sa.Boolean(),
    "int": sa.BigInteger(),
    "float": sa.Float(),
    "text": sa.Text(),
    "json": sa.Text(),
}


KINDS = tuple(_TYPES)  # what a declared column may be
_NATIVE = {bool: "bool", int: "int", float: "float", str: "text"}


def _fits(kind: str, value: Any) -> Any:
    """``value`` as its column of ``kind`` keeps it (None when it does not fit: in ``_raw``)."""
    if value is None:
        return None
    if _NATIVE.get(type(value)) == kind and (kind != "int" or _INT_LOW <= value < _INT_HIGH):
        return value  # the common case, first
    found = _kind(value)
    if found == kind:
        return orjson.dumps(value).decode() if kind == "json" else value
    if kind == "float" and found == "int":
        return float(value)
    if kind in ("text", "json"):
        return orjson.dumps(value).decode() if found == "json" or kind == "json" else str(value)
    return None


_NATIVE_TYPE: dict[str, type] = {kind: native for native, kind in _NATIVE.items()}


class _NoType:
    """Stands for a column kind no value is taken for as it is (``json``: always written)."""


class Columns:
    """How the values of a record's fields become a row for columns of these ``kinds``, fast
    for the common record: each field present and of its column's own type, taken as it is
    (what :func:`_fits` does first), checked with one comparison of the values' types; any
    other record goes through :func:`_fits` value by value."""

    def __init__(self, kinds: Sequence[tuple[str, str]]) -> None:
        self.names = [name for name, _ in kinds]
        self.kinds = [kind for _, kind in kinds]
        self.expected = tuple(_NATIVE_TYPE.get(kind, _NoType) for kind in self.kinds)
        self.ints = [i for i, kind in enumerate(self.kinds) if kind == "int"]
        if len(self.names) == 1:
            only = self.names[0]
            self.pick: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda r: (r[only],)
        elif self.names:
            self.pick = operator.itemgetter(*self.names)
        else:
            self.pick = lambda r: ()
        """The record's values for the columns as they are (``KeyError``: a field is missing)."""

    def values(self, record: dict[str, Any]) -> tuple[Any, ...]:
        """The record's values for the columns, each one its column keeps (else None)."""
        try:
            values = self.pick(record)
        except KeyError:  # a field is missing: None for it, as _fits gives
            values = tuple(map(record.get, self.names))
        return values if self.known(values) else tuple(map(_fits, self.kinds, values))

    def known(self, values: tuple[Any, ...]) -> bool:
        """Whether each value is of its column's own type, so its column keeps it as it is."""
        return tuple(map(type, values)) == self.expected and all(
            _INT_LOW <= values[i] < _INT_HIGH for i in self.ints
        )


def content_hash(record: dict[str, Any]) -> str:
    text = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def _comparable(value: Any) -> tuple[int, Any] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return None


class Target:
    """One source's table in the ingestion database."""

    def __init__(
        self,
        engine: sa.Engine,
        table: str,
        primary_key: Sequence[str],
        columns: Mapping[str, str] | None = None,
    ) -> None:
        """``columns`` declares the table's columns and their kinds (``KINDS``): only those
        are made, typed as declared, and no column is added for a new field (the record is
        whole in ``_raw``); without it, columns are inferred from the records."""
        self.engine = engine
        self.name = table
        self.primary_key = list(primary_key)
        self.declared = dict(columns) if columns is not None else None
        self.metadata = sa.MetaData()
        self.state = state_table(self.metadata)
        self.pages = page_table(self.metadata)
        self.table: sa.Table | None = None
        self.kinds: dict[str, str] = {}
        self._compiled: dict[tuple[str, ...], tuple[str, Order]] = {}

    # the table ------------------------------------------------------------------------------

    def _load(self, conn: sa.Connection) -> None:
        self.state.create(conn, checkfirst=True)
        self.pages.create(conn, checkfirst=True)
        inspector = sa.inspect(conn)
        if not inspector.has_table(self.name):
            return
        self.table = sa.Table(self.name, sa.MetaData(), autoload_with=conn)
        for column in self.table.columns:
            if column.name not in RESERVED:
                self.kinds[column.name] = _kind_of_type(column.type)

    def _create(self, conn: sa.Connection, sample: dict[str, Any]) -> None:
        columns: list[sa.Column[Any]] = [
            sa.Column("_row_id", sa.Integer, primary_key=True, autoincrement=True)
        ]
        declared = self.declared or {}
        for name in self.primary_key:
            kind = declared.get(name) or _kind(sample.get(name))
            kind = "text" if kind == "json" else kind
            self.kinds[name] = kind
            columns.append(sa.Column(name, _TYPES[kind], nullable=False))
        for name, kind in declared.items():
            if name not in self.kinds:
                self.kinds[name] = kind
                columns.append(sa.Column(name, _TYPES[kind]))
        columns += [
            sa.Column("_raw", sa.Text, nullable=False),
            sa.Column("_hash", sa.String(32), nullable=False),
            sa.Column("_ingested_at", sa.Float, nullable=False),
        ]
        table = sa.Table(self.name, sa.MetaData(), *columns)
        sa.Index(f"{self.name}_key", *[table.c[n] for n in self.primary_key], unique=True)
        table.create(conn)
        self.table = table

    def _widen(self, conn: sa.Connection, records: list[dict[str, Any]]) -> None:
        """Add a column for each field not seen before (named like an identifier), unless
        the columns are declared."""
        assert self.table is not None
        if self.declared is not None:
            return
        taken = {name.lower() for name in self.kinds} | set(RESERVED)
        fields = set().union(*records) - self.kinds.keys()
        new: dict[str, str] = {}
        for key in sorted(fields):
            if key.lower() in taken or not NAME.match(key):
                continue
            value = next((r[key] for r in records if r.get(key) is not None), None)
            if value is None:
                continue
            new[key] = _kind(value)
            taken.add(key.lower())
        if not new:
            return
        preparer = conn.dialect.identifier_preparer
        for key, kind in new.items():
            column_type = _TYPES[kind].compile(dialect=conn.dialect)
            conn.exec_driver_sql(
                f"ALTER TABLE {preparer.quote(self.name)} ADD COLUMN {preparer.quote(key)} "
                f"{column_type}"
            )
            self.kinds[key] = kind
            self.table.append_column(sa.Column(key, _TYPES[kind]), replace_existing=True)

    # one page -------------------------------------------------------------------------------

    def write_page(
        self,
        records: list[Any],
        *,
        source_id: str,
        cursor_field: str | None = None,
        page: int = 0,
        digest: str | None = None,
    ) -> PageOutcome:
        """Upsert one page of records and record its cursor, in one transaction. With the
        ``digest`` of the page's body (and no incremental cursor), a page whose body is the one
        last written is not read again: its records are counted unchanged."""
        remember = digest is not None and cursor_field is None
        with self.engine.begin() as conn:
            if self.table is None:
                self._load(conn)
            if remember and self.table is not None:
                known = self._known_page(conn, source_id, page, digest or "")
                if known is not None:
                    return known
            outcome = PageOutcome()
            keyed: dict[tuple[Any, ...], dict[str, Any]] = {}
            key_columns = self._key_columns()
            for index, record in enumerate(records):
                if key_columns is not None and type(record) is dict:
                    try:
                        key = key_columns.pick(record)
                    except KeyError:
                        key = None
                    if key is not None and key_columns.known(key):
                        keyed[key] = record  # the common record: its key as its columns keep it
                        continue
                reason = self._reason(record)
                if reason is not None:
                    if len(outcome.rejected) < MAX_REJECTS:
                        outcome.rejected.append({"page": page, "index": index, "reason": reason})
                    else:
                        outcome.rejected.append({})  # counted, not kept
                    continue
                keyed[tuple(record[name] for name in self.primary_key)] = record
            if keyed:
                if self.table is None:
                    self._create(conn, next(iter(keyed.values())))
                self._widen(conn, list(keyed.values()))
                self._upsert(conn, keyed, outcome)
            if cursor_field is not None:
                self._move_pending(conn, source_id, keyed.values(), cursor_field)
            elif remember and self.table is not None:
                self._remember_page(conn, source_id, page, digest or "", len(keyed), outcome)
        return outcome

    def known_pages(self, source_id: str) -> dict[int, tuple[str, int, int]]:
        """Page number → the digest of the body last written for it, its records with a key
        and those rejected: for a run to pass over the pages written already."""
        with self.engine.begin() as conn:
            if self.table is None:
                self._load(conn)
            if self.table is None:  # no table (yet, or any more): every page is new
                return {}
            pages = self.pages.c
            found = conn.execute(
                sa.select(pages.page, pages.digest, pages.keyed, pages.rejected).where(
                    pages.source_id == source_id
                )
            )
            return {row[0]: (row[1], row[2], row[3]) for row in found}

    @staticmethod
    def known_outcome(keyed: int, rejected: int) -> PageOutcome:
        """What writing a page already written again comes to: each record unchanged."""
        return PageOutcome(unchanged=keyed, rejected=[{}] * rejected, same_page=True)

    def _known_page(
        self, conn: sa.Connection, source_id: str, page: int, digest: str
    ) -> PageOutcome | None:
        """The outcome of a page whose body has the digest last recorded for it (else None)."""
        found = conn.execute(
            sa.select(self.pages.c.digest, self.pages.c.keyed, self.pages.c.rejected).where(
                self.pages.c.source_id == source_id, self.pages.c.page == page
            )
        ).first()
        if found is None or found[0] != digest:
            return None
        return self.known_outcome(found[1], found[2])

    def _remember_page(
        self,
        conn: sa.Connection,
        source_id: str,
        page: int,
        digest: str,
        keyed: int,
        outcome: PageOutcome,
    ) -> None:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        values = {"digest": digest, "keyed": keyed, "rejected": len(outcome.rejected)}
        statement = dialect.insert(self.pages).values(source_id=source_id, page=page, **values)
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[self.pages.c.source_id, self.pages.c.page], set_=values
            )
        )

    def _key_columns(self) -> Columns | None:
        """The key's columns once their kinds are known (the table made)."""
        kinds = [(name, self.kinds.get(name, "")) for name in self.primary_key]
        return Columns(kinds) if all(kind in _NATIVE_TYPE for _, kind in kinds) else None

    def _reason(self, record: Any) -> str | None:
        if not isinstance(record, dict):
            return f"not an object but {type(record).__name__}"
        for name in self.primary_key:
            value = record.get(name)
            if value is None:
                return f"no value for the key field {name!r}"
            kind = self.kinds.get(name)
            if _kind(value) == "json" or (kind is not None and _fits(kind, value) is None):
                return f"the key field {name!r} holds {type(value).__name__}"
        return None

    def _upsert(
        self,
        conn: sa.Connection,
        keyed: dict[tuple[Any, ...], dict[str, Any]],
        outcome: PageOutcome,
    ) -> None:
        table = self.table
        assert table is not None
        key_columns = [table.c[name] for name in self.primary_key]
        hashes = {key: content_hash(record) for key, record in keyed.items()}
        existing: dict[tuple[Any, ...], str] = {}
        keys = list(keyed)
        if len(key_columns) == 1 and conn.dialect.name == "sqlite":
            # one statement, the keys as one JSON array taken apart by SQLite itself
            preparer = conn.dialect.identifier_preparer
            found_hashes = conn.exec_driver_sql(
                f"SELECT {preparer.quote(key_columns[0].name)}, _hash FROM "
                f"{preparer.quote(self.name)} WHERE {preparer.quote(key_columns[0].name)} IN "
                "(SELECT value FROM json_each(?))",
                (orjson.dumps([k[0] for k in keys]).decode(),),
            )
            existing = {(found[0],): found[1] for found in found_hashes}
            keys = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            if len(key_columns) == 1:
                where = key_columns[0].in_([k[0] for k in chunk])
            else:
                where = sa.tuple_(*key_columns).in_(chunk)
            for found in conn.execute(sa.select(*key_columns, table.c._hash).where(where)):
                existing[tuple(found[:-1])] = found[-1]
        now = time.time()
        columns = Columns(list(self.kinds.items()))
        rows: list[tuple[Any, ...]] = []
        for key, record in keyed.items():
            known = existing.get(key)
            if known == hashes[key]:
                outcome.unchanged += 1
                continue
            if known is None:
                outcome.inserted += 1
            else:
                outcome.updated += 1
            rows.append((*columns.values(record), orjson.dumps(record).decode(), hashes[key], now))
        if rows:
            names = columns.names
            sql, order = self._statement(conn, names)
            if order is None:
                conn.exec_driver_sql(sql, rows)
            elif order == "named":
                named = (*names, "_raw", "_hash", "_ingested_at")
                conn.exec_driver_sql(sql, [dict(zip(named, r, strict=True)) for r in rows])
            else:
                pick = operator.itemgetter(*order)
                conn.exec_driver_sql(sql, [pick(r) for r in rows])

    def _statement(self, conn: sa.Connection, names: list[str]) -> tuple[str, Order]:
        """The upsert for these columns, as the driver's SQL (compiled once per column set), and
        the order of a row's values in it (None: as given; ``named``: by name). The rows go to
        the driver's executemany directly: SQLAlchemy's per-row parameter processing cost more
        than the statement itself."""
        columns = (*names, "_raw", "_hash", "_ingested_at")
        cached = self._compiled.get(columns)
        if cached is not None:
            return cached
        table = self.table
        assert table is not None
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(table).values({name: sa.bindparam(name) for name in columns})
        keep = (*self.primary_key, "_row_id")
        statement = statement.on_conflict_do_update(
            index_elements=[table.c[name] for name in self.primary_key],
            set_={c.name: statement.excluded[c.name] for c in table.columns if c.name not in keep},
        )
        compiled = statement.compile(dialect=conn.dialect)
        order: Order = "named"
        if compiled.positional and compiled.positiontup is not None:
            order = [columns.index(name) for name in compiled.positiontup]
            order = None if order == list(range(len(columns))) else order
        result = (str(compiled), order)
        self._compiled[columns] = result
        return result

    def _move_pending(
        self,
        conn: sa.Connection,
        source_id: str,
        records: Any,
        cursor_field: str,
    ) -> None:
        values = [_comparable(r.get(cursor_field)) for r in records]
        found = [v for v in values if v is not None]
        if not found:
            return
        highest = max(found)
        row = conn.execute(
            sa.select(self.state.c.pending_cursor).where(self.state.c.source_id == source_id)
        ).first()
        pending = _decode(row[0]) if row is not None and row[0] is not None else None
        current = _comparable(pending)
        if current is not None and current >= highest:
            return
        encoded = orjson.dumps(highest[1]).decode()
        if row is None:
            conn.execute(
                self.state.insert().values(
                    source_id=source_id, pending_cursor=encoded, updated_at=time.time()
                )
            )
        else:
            conn.execute(
                self.state.update()
                .where(self.state.c.source_id == source_id)
                .values(pending_cursor=encoded, updated_at=time.time())
            )

    # the cursor -----------------------------------------------------------------------------

    def cursor(self, source_id: str) -> Any:
        """The cursor the last complete run left (None: start from the beginning)."""
        with self.engine.begin() as conn:
            self.state.create(conn, checkfirst=True)
            row = conn.execute(
                sa.select(self.state.c.cursor).where(self.state.c.source_id == source_id)
            ).first()
        return _decode(row[0]) if row is not None and row[0] is not None else None

    def forget_cursor(self, conn: sa.Connection, source_id: str) -> None:
        """Start from the beginning next run (the cursor's field changed), in ``conn``'s
        transaction."""
        self.state.create(conn, checkfirst=True)
        conn.execute(self.state.delete().where(self.state.c.source_id == source_id))

    def forget_pages(self, conn: sa.Connection, source_id: str) -> None:
        """Read every page again next run (how a body becomes rows changed), in ``conn``'s
        transaction."""
        self.pages.create(conn, checkfirst=True)
        conn.execute(self.pages.delete().where(self.pages.c.source_id == source_id))

    def finish_run(self, source_id: str) -> Any:
        """The run ended: the pending cursor becomes the cursor. Returns the cursor now."""
        with self.engine.begin() as conn:
            self.state.create(conn, checkfirst=True)
            row = conn.execute(
                sa.select(self.state.c.cursor, self.state.c.pending_cursor).where(
                    self.state.c.source_id == source_id
                )
            ).first()
            if row is None:
                return None
            if row[1] is not None:
                conn.execute(
                    self.state.update()
                    .where(self.state.c.source_id == source_id)
                    .values(cursor=row[1], pending_cursor=None, updated_at=time.time())
                )
                return _decode(row[1])
            return _decode(row[0]) if row[0] is not None else None

    # reading back ---------------------------------------------------------------------------

    def rows(self, *, after: int, limit: int) -> list[tuple[int, Any]]:
        """``(row id, record)`` in insertion order after ``after``."""
        with self.engine.connect() as conn:
            if self.table is None:
                self._load(conn)
                conn.commit()
            if self.table is None:
                return []
            table = self.table
            found = conn.execute(
                sa.select(table.c._row_id, table.c._raw)
                .where(table.c._row_id > after)
                .order_by(table.c._row_id)
                .limit(limit)
            ).all()
        return [(int(row[0]), orjson.loads(row[1])) for row in found]

    def drop(self) -> None:
        with self.engine.begin() as conn:
            sa.Table(self.name, sa.MetaData()).drop(conn, checkfirst=True)


def _kind_of_type(column_type: sa.types.TypeEngine[Any]) -> str:
    if isinstance(column_type, sa.Boolean):
        return "bool"
    if isinstance(column_type, sa.Integer):
        return "int"
    if isinstance(column_type, sa.Float | sa.Numeric):
        return "float"
    return "text"


def _decode(text: str) -> Any:
    return orjson.loads(text)
