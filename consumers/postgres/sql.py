"""SQL text for the PostgreSQL participant: set-based statements over a JSON array of rows.

Every statement takes its rows as one `jsonb[]` parameter and types them with
`jsonb_populate_record(NULL::table, ...)`, so one statement serves a whole group of steps on the same
table whatever its column types, and PostgreSQL, not Python, converts JSON values to column types.
Identifiers were checked when the operation was parsed (polycommit.parsed) and are quoted here as well.
"""

from __future__ import annotations

from functools import lru_cache

from polycommit import versioning

MARKER_TABLE = "polycommit_steps"
CREATE_MARKERS = f"""
CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (
    tx_id        text        NOT NULL,
    step_index   integer     NOT NULL,
    action       text        NOT NULL,
    before_image jsonb,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tx_id, step_index, action)
)"""
READ_MARKERS = f"""
SELECT m.tx_id, m.step_index, m.action, m.before_image::text
FROM {MARKER_TABLE} m
JOIN unnest($1::text[], $2::int[]) AS k(tx_id, step_index) USING (tx_id, step_index)"""
WRITE_MARKERS = f"""
INSERT INTO {MARKER_TABLE} (tx_id, step_index, action, before_image)
SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::jsonb[])"""
# Versions (polycommit.versioning): one row per resource key, never deleted (a deleted row's version is
# its tombstone). Locked in one canonical order, so two batches locking the same keys never deadlock here.
VERSION_TABLE = versioning.VERSION_TABLE
CREATE_VERSIONS = f"""
CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    resource text   PRIMARY KEY,
    version  bigint NOT NULL
)"""
# Rows at version 0 ("never written") make absent keys lockable: a row lock cannot hold a key that has
# no row, and two writers expecting 0 must not both create it.
ENSURE_VERSIONS = f"""
INSERT INTO {VERSION_TABLE} (resource, version) SELECT r, 0 FROM unnest($1::text[]) AS r ORDER BY r
ON CONFLICT (resource) DO NOTHING"""
LOCK_VERSIONS = f"""
SELECT resource, version FROM {VERSION_TABLE} WHERE resource = ANY($1::text[]) ORDER BY resource FOR UPDATE"""
BUMP_VERSIONS = f"""
INSERT INTO {VERSION_TABLE} (resource, version) SELECT r, 1 FROM unnest($1::text[]) AS r ORDER BY r
ON CONFLICT (resource) DO UPDATE SET version = {VERSION_TABLE}.version + 1"""
READ_VERSION = f"SELECT version FROM {VERSION_TABLE} WHERE resource = $1"
# A raw step runs in a savepoint of the batch's transaction: its failure undoes it alone.
SAVEPOINT = "SAVEPOINT polycommit_raw_step"
RELEASE_SAVEPOINT = "RELEASE SAVEPOINT polycommit_raw_step"
ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT polycommit_raw_step"
MARKERS_OF = f"SELECT step_index, action, before_image::text FROM {MARKER_TABLE} WHERE tx_id = $1"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _rows(table: str) -> str:
    return (
        "unnest($1::jsonb[]) WITH ORDINALITY AS i(doc, ord) "
        f"CROSS JOIN LATERAL jsonb_populate_record(NULL::{quote(table)}, i.doc) AS r"
    )


def _match(keys: tuple[str, ...], left: str = "t", right: str = "r") -> str:
    return f"({', '.join(f'{left}.{quote(k)}' for k in keys)}) = ({', '.join(f'{right}.{quote(k)}' for k in keys)})"


@lru_cache(maxsize=256)
def lock_rows(table: str, keys: tuple[str, ...]) -> str:
    """(ordinal, current row as JSON) of every row the keys name, locked until the transaction ends.

    FOR UPDATE returns the newest committed version, so each before-image is exactly what its step
    overwrites, and nobody can change the row between this read and the write."""
    return (
        f"SELECT i.ord::int, to_jsonb(t)::text FROM {_rows(table)} "
        f"JOIN {quote(table)} t ON {_match(keys)} FOR UPDATE OF t"
    )


@lru_cache(maxsize=256)
def update_rows(table: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """UPDATE existing rows: a partial row must not trip NOT NULL columns it leaves out, as an
    INSERT .. ON CONFLICT would (the proposed row is checked before the conflict is found)."""
    assignments = ", ".join(f"{quote(c)} = r.{quote(c)}" for c in columns)
    return f"UPDATE {quote(table)} t SET {assignments} FROM {_rows(table)} WHERE {_match(keys)}"


@lru_cache(maxsize=256)
def insert_rows(table: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> str:
    names = ", ".join(quote(c) for c in columns)
    updates = [f"{quote(c)} = EXCLUDED.{quote(c)}" for c in columns if c not in keys]
    conflict = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
    picked = ", ".join(f"r.{quote(c)}" for c in columns)
    return (
        f"INSERT INTO {quote(table)} ({names}) SELECT {picked} FROM {_rows(table)} "
        f"ON CONFLICT ({', '.join(quote(k) for k in keys)}) {conflict}"
    )


@lru_cache(maxsize=256)
def delete_rows(table: str, keys: tuple[str, ...]) -> str:
    return f"DELETE FROM {quote(table)} t USING {_rows(table)} WHERE {_match(keys)}"


@lru_cache(maxsize=256)
def read_row(table: str, keys: tuple[str, ...]) -> str:
    return f"SELECT to_jsonb(t)::text FROM {_rows(table)} JOIN {quote(table)} t ON {_match(keys)}"
