"""`polycommit demo`: ingest documents and merge customers across PostgreSQL, Qdrant and Neo4j.

Runs the coordinator and the three store consumers in this process, sends the business actions as
sagas through Kafka, and prints one row per transaction and then what each store holds. One merge is
meant to fail (the merged customer lacks the credit to move) and one ingest carries a wrong-size
embedding: both are compensated, and the stores show no trace of them. Then two clerks top up one
customer's credit at once in interactive transactions (polycommit/tooling/demo_race.py): one runs again
after a stale read, and neither top-up is lost.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from rich.console import Console
from rich.table import Table

from polycommit import operations as ops
from polycommit.bus import create_topics
from polycommit.client import Coordinator, Saga, TransactionResult
from polycommit.config import Settings
from polycommit.tooling import workload
from polycommit.tooling.demo_race import Race, top_up_race
from polycommit.tooling.runtime import Runtime

GLYPH = {
    "applied": "✓",
    "compensated": "↺",
    "failed": "✗",
    "pending": "·",
    "not_applied": "∅",
    "timed_out": "⌛",
    "skipped": "⤼",
    "compensation_failed": "‼",
}
STATUS_STYLE = {"completed": "green", "compensated": "yellow", "failed": "red", "stuck": "bold red"}


def _plan(run: str) -> list[tuple[Saga, str]]:
    """(saga, the status it should end with) in the order they run."""
    ada, grace, linus = f"{run}-ada", f"{run}-grace", f"{run}-linus"
    plan: list[tuple[Saga, str]] = [
        (workload.create_customer(ada, "Ada Lovelace", credit=100), "completed"),
        (workload.create_customer(grace, "Grace Hopper", credit=20), "completed"),
        (workload.create_customer(linus, "Linus Pauling", credit=5), "completed"),
        (workload.ingest_document(f"{run}-doc-1", "Notes on the Engine", "bernoulli numbers", ada), "completed"),
        (workload.ingest_document(f"{run}-doc-2", "Sketch of the Engine", "operations cards", ada), "completed"),
        (workload.ingest_document(f"{run}-doc-3", "COBOL", "common business language", grace), "completed"),
        (workload.merge_customers(ada, grace, transfer_credit=20), "completed"),
        (workload.merge_customers(ada, linus, transfer_credit=50), "compensated"),
    ]
    bad = workload.ingest_document(f"{run}-doc-4", "Bad embedding", "three dimensions", linus)
    bad.steps[1]["operation"] = ops.upsert_points(workload.DOCUMENTS, [ops.point(f"{run}-doc-4", [0.1, 0.2, 0.3])])
    plan.append((bad, "compensated"))
    return plan


def _transactions_table(rows: list[tuple[Saga, TransactionResult, str]]) -> Table:
    table = Table(title="transactions", show_lines=False)
    for column in ("#", "saga", "status", "steps", "ms", "note"):
        table.add_column(column)
    for i, (saga, result, expected) in enumerate(rows, 1):
        steps = " ".join(f"{s.name}{GLYPH.get(s.status, '?')}" for s in result.steps)
        style = STATUS_STYLE.get(result.status, "")
        note = "" if result.status == expected else f"expected {expected}"
        if result.error and result.status != "completed":
            note = (note + " " + result.error).strip()
        table.add_row(str(i), saga.name, f"[{style}]{result.status}[/]", steps, str(result.duration_ms), note[:90])
    return table


async def _stores(settings: Settings, runtime: Runtime, run: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        customers = [
            dict(r)
            for r in await conn.fetch(
                "SELECT id, name, credit, merged_into FROM customers WHERE id LIKE $1 ORDER BY id", f"{run}-%"
            )
        ]
        documents = [
            dict(r)
            for r in await conn.fetch(
                "SELECT id, title, customer_id FROM documents WHERE id LIKE $1 ORDER BY id", f"{run}-%"
            )
        ]
    finally:
        await conn.close()
    qdrant = runtime.workers["qdrant"].participant
    ids = [ops.point_id(f"{run}-doc-{i}") for i in range(1, 5)]
    points = await qdrant.read_points(workload.DOCUMENTS, ids)  # type: ignore[attr-defined]
    neo4j = runtime.workers["neo4j"].participant
    async with neo4j.driver.session() as session:  # type: ignore[attr-defined]
        result = await session.run(
            "MATCH (a)-[r]->(b) WHERE a.id STARTS WITH $run RETURN labels(a)[0] + ':' + a.id AS src, "
            "type(r) AS rel, labels(b)[0] + ':' + b.id AS dst ORDER BY src, rel, dst",
            run=run,
        )
        edges = [dict(r) for r in await result.data()]
        result = await session.run(
            "MATCH (n) WHERE n.id STARTS WITH $run RETURN labels(n)[0] AS label, n.id AS id ORDER BY id", run=run
        )
        nodes = [dict(r) for r in await result.data()]
    return {
        "postgres": {"customers": customers, "documents": documents},
        "qdrant": {"documents": [{"id": pid, "title": p["payload"].get("title")} for pid, p in sorted(points.items())]},
        "neo4j": {"nodes": nodes, "relationships": edges},
    }


def _print_stores(console: Console, stores: dict[str, Any]) -> None:
    customers = Table(title="PostgreSQL customers")
    for column in ("id", "name", "credit", "merged_into"):
        customers.add_column(column)
    for row in stores["postgres"]["customers"]:
        customers.add_row(row["id"], row["name"], str(row["credit"]), row["merged_into"] or "")
    documents = Table(title="PostgreSQL documents / Qdrant points")
    for column in ("id", "title", "customer", "embedding in Qdrant"):
        documents.add_column(column)
    in_qdrant = {p["id"] for p in stores["qdrant"]["documents"]}
    for row in stores["postgres"]["documents"]:
        documents.add_row(
            row["id"], row["title"], row["customer_id"], "yes" if ops.point_id(row["id"]) in in_qdrant else "NO"
        )
    graph = Table(title="Neo4j relationships")
    for column in ("from", "type", "to"):
        graph.add_column(column)
    for edge in stores["neo4j"]["relationships"]:
        graph.add_row(edge["src"], edge["rel"], edge["dst"])
    console.print(customers, documents, graph)
    console.print(f"Neo4j nodes: {len(stores['neo4j']['nodes'])}, Qdrant points: {len(in_qdrant)}")


async def run_demo(settings: Settings, *, as_json: bool = False) -> int:
    console = Console(stderr=as_json, width=None if Console().is_terminal else 150)
    run = f"demo{uuid.uuid4().hex[:6]}"
    await create_topics(settings)
    await workload.prepare_postgres(settings)
    with console.status("starting the coordinator and the PostgreSQL, Qdrant and Neo4j consumers"):
        runtime = await Runtime(settings).start()
    try:
        await runtime.workers["qdrant"].participant.ensure_collection(  # type: ignore[attr-defined]
            workload.DOCUMENTS, workload.DIMENSIONS
        )
        rows: list[tuple[Saga, TransactionResult, str]] = []
        async with Coordinator(settings) as client:
            for saga, expected in _plan(run):
                with console.status(f"running {saga.name}"):
                    rows.append((saga, await client.execute(saga), expected))
            with console.status("two clerks top up one customer's credit at once"):
                race: Race = await top_up_race(client, f"{run}-linus", amount=10)
        stores = await _stores(settings, runtime, run)
    finally:
        await runtime.stop()
    surprises = [saga.name for saga, result, expected in rows if result.status != expected]
    if not race.ok:
        surprises.append("top-up race")
    if as_json:
        print(
            json.dumps(
                {
                    "run": run,
                    "transactions": [
                        {
                            "name": s.name,
                            "tx_id": r.tx_id,
                            "status": r.status,
                            "expected": e,
                            "duration_ms": r.duration_ms,
                            "steps": [{"name": x.name, "status": x.status, "error": x.error} for x in r.steps],
                        }
                        for s, r, e in rows
                    ],
                    "race": {**vars(race), "ok": race.ok},
                    "stores": stores,
                    "ok": not surprises,
                },
                indent=2,
                default=str,
            )
        )
    else:
        console.print(_transactions_table(rows))
        console.print("steps: ✓ applied  ↺ compensated  ✗ failed  · not run  ∅ compensation was a no-op")
        console.print(f"[{'green' if race.ok else 'red'}]{race.describe()}[/]")
        _print_stores(console, stores)
        console.print(
            "[green]every transaction ended as expected[/]"
            if not surprises
            else f"[red]unexpected outcomes: {surprises}[/]"
        )
    return 1 if surprises else 0
