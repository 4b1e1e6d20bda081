"""The example domain shared by the demo, the benchmark and the end-to-end tests.

Documents live as a PostgreSQL row, a Qdrant embedding and a Neo4j node linked to its author; customers
as a row and a node. `ingest_document` and `merge_customers` build the business actions as sagas.
Embeddings are deterministic toy vectors (a hash of the text), so runs are repeatable without a model.
"""

from __future__ import annotations

import hashlib
import math
import struct

import asyncpg

from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.config import Settings

DIMENSIONS = 16
DOCUMENTS = "documents"
CUSTOMERS = "customers"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {DOCUMENTS} (
    id          text PRIMARY KEY,
    title       text NOT NULL,
    body        text NOT NULL DEFAULT '',
    customer_id text
);
CREATE TABLE IF NOT EXISTS {CUSTOMERS} (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    email       text,
    credit      integer NOT NULL DEFAULT 0 CHECK (credit >= 0),
    merged_into text
);
"""


def embed(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """A unit vector derived from the text's hash: stable across runs and machines."""
    digest = b""
    counter = 0
    while len(digest) < 4 * dimensions:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    raw = [x / 2**31 for x in struct.unpack(f"<{dimensions}i", digest[: 4 * dimensions])]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


async def prepare_postgres(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


def ingest_document(doc_id: str, title: str, body: str, customer_id: str, *, retries: int = 2) -> Saga:
    """One document into all three stores: row, embedding, node + WROTE relationship from its author."""
    saga = Saga(f"ingest {doc_id}")
    saga.step(
        ops.upsert_row(DOCUMENTS, {"id": doc_id}, {"title": title, "body": body, "customer_id": customer_id}),
        name="row",
        retries=retries,
    )
    saga.step(
        ops.upsert_points(DOCUMENTS, [ops.point(doc_id, embed(f"{title} {body}"), {"doc_id": doc_id, "title": title})]),
        name="embedding",
        retries=retries,
    )
    saga.step(ops.merge_node("Document", {"id": doc_id}, {"title": title}), name="node", retries=retries)
    saga.step(
        ops.merge_relationship(
            "WROTE", ops.node("Customer", {"id": customer_id}), ops.node("Document", {"id": doc_id})
        ),
        name="authorship",
        retries=retries,
    )
    return saga


def create_customer(customer_id: str, name: str, credit: int = 0) -> Saga:
    saga = Saga(f"create customer {customer_id}")
    saga.step(ops.upsert_row(CUSTOMERS, {"id": customer_id}, {"name": name, "credit": credit}), name="row")
    saga.step(ops.merge_node("Customer", {"id": customer_id}, {"name": name}), name="node")
    return saga


def merge_customers(survivor: str, merged: str, *, transfer_credit: int) -> Saga:
    """Fold one customer into another: mark it merged, link the nodes, move its credit (raw SQL steps
    declare their own compensation). The credit move fails, and everything is compensated, when the
    merged customer has less credit than asked: the CHECK constraint refuses a negative balance."""
    saga = Saga(f"merge {merged} into {survivor}")
    saga.step(ops.upsert_row(CUSTOMERS, {"id": merged}, {"merged_into": survivor}), name="mark merged")
    saga.step(
        ops.merge_relationship(
            "MERGED_INTO", ops.node("Customer", {"id": merged}), ops.node("Customer", {"id": survivor})
        ),
        name="link nodes",
    )
    saga.step(
        ops.sql(f"UPDATE {CUSTOMERS} SET credit = credit + $1 WHERE id = $2", [transfer_credit, survivor]),
        compensate=ops.sql(f"UPDATE {CUSTOMERS} SET credit = credit - $1 WHERE id = $2", [transfer_credit, survivor]),
        name="credit survivor",
    )
    saga.step(
        ops.sql(f"UPDATE {CUSTOMERS} SET credit = credit - $1 WHERE id = $2", [transfer_credit, merged]),
        compensate=ops.sql(f"UPDATE {CUSTOMERS} SET credit = credit + $1 WHERE id = $2", [transfer_credit, merged]),
        name="debit merged",
    )
    return saga
