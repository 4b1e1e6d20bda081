"""Read-only views of the log for operators: transactions in flight or stuck, and dead letters.

Both read a topic from offset 0 to its current end with a group-less consumer, so looking never moves
anybody's offsets, and hand the records to a pure fold of `projections/` (tx_state, status, dead_letters).
"""

from __future__ import annotations

import json
from typing import Any

from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from polycommit.bus import make_admin, read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.events import SagaSnapshot
from projections import dead_letters as dead_letter_fold
from projections import status as status_fold
from projections import tx_state


async def transactions_in_flight(settings: Settings) -> dict[str, SagaSnapshot]:
    raw: list[tuple[str, bytes | None]] = []
    await read_topic(settings, topics_for(settings).tx_state, lambda r: raw.append((r.key.decode(), r.value)))
    return tx_state.fold_raw(default_codec(), raw)[0]


async def coordinator_members(settings: Settings) -> list[dict[str, Any]] | str:
    """The coordinator group's live members (orchestrator/members.py): which one is active, who stands by;
    why not, as text, when the group cannot be described (the transactions are still reported).

    One group per request: aiokafka decodes a DescribeGroups v3 answer with the v2 layout, which only holds
    for a single group (the field v3 adds comes last, after it)."""
    from orchestrator.members import member_views

    admin = make_admin(settings)
    try:
        await admin.start()
        described = await admin.describe_consumer_groups([f"{settings.topic_prefix}-coordinator"])
        return member_views(m for response in described for group in response.groups for m in group[5])
    except (KafkaError, ValueError) as exc:  # ValueError: an answer aiokafka cannot decode
        return f"unknown ({type(exc).__name__}: {exc})"
    finally:
        await admin.close()


def describe_members(members: list[dict[str, Any]] | str) -> str:
    if isinstance(members, str):
        return f"coordinator members: {members}"
    if not members:
        return "coordinator members: none running"

    def role(m: dict[str, Any]) -> str:
        owned = len(m["partitions"])
        return f"active ({owned} partition{'' if owned == 1 else 's'})" if m["active"] else "standing by"

    described = [f"{m['instance']} {role(m)}" for m in members]
    return "coordinator members: " + ", ".join(described)


async def print_status(settings: Settings, *, as_json: bool) -> int:
    report = status_fold.report(await transactions_in_flight(settings))
    report["coordinator_members"] = await coordinator_members(settings)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        console = Console()
        console.print(describe_members(report["coordinator_members"]))
        console.print(f"in flight: {sum(report['in_flight'].values())} {report['in_flight']}")
        table = Table(title="stuck transactions (compensation keeps failing; still retried)")
        for column in ("tx_id", "name", "step", "attempts", "compensation error", "why compensating"):
            table.add_column(column)
        for row in report["stuck"]:
            table.add_row(
                row["tx_id"],
                row["name"],
                str(row["step"]),
                str(row["compensation_attempts"]),
                row["compensation_error"] or "",
                row["error"] or "",
            )
        if report["stuck"]:
            console.print(table)
            console.print("retry now: polycommit tx retry TXID; repaired by hand: polycommit tx resolve TXID --step N")
            return 1
        console.print(table)
    return 1 if report["stuck"] else 0


async def dead_letters(settings: Settings, limit: int | None = None) -> list[dict[str, Any]]:
    records: list[tuple[str, bytes | None]] = []
    await read_topic(
        settings,
        topics_for(settings).dead_letters,
        lambda r: records.append((f"dead-letters/{r.partition}/{r.offset}", r.value)),
    )
    return dead_letter_fold.fold_positioned(default_codec(), records, limit)


async def print_dead_letters(settings: Settings, *, limit: int, as_json: bool) -> int:
    letters = await dead_letters(settings, limit)
    if as_json:
        print(json.dumps(letters, indent=2, sort_keys=True, default=str))
        return 0
    table = Table(title=f"dead letters (last {limit})")
    for column in ("id", "topic/partition/offset", "error", "tx", "consumer"):
        table.add_column(column)
    for letter in letters:
        where = f"{letter['original_topic']}/{letter['partition']}/{letter['offset']}"
        error = f"{letter['error_class']}: {letter['error_message'][:80]}"
        table.add_row(letter["id"], where, error, letter["tx_id"] or "", letter["consumer"])
    Console().print(table)
    return 0
