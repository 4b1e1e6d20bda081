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

from polycommit.bus import Topics, make_admin, read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.events import InputPosition, SagaSnapshot
from polycommit.log_reader import make_reader, topic_partitions
from projections import dead_letters as dead_letter_fold
from projections import status as status_fold
from projections import tx_state


async def changelog(settings: Settings) -> tx_state.Changelog:
    """The coordinator's changelog folded: the transactions in flight, and how far it folded its inputs."""
    raw: list[tuple[str, bytes | None]] = []
    await read_topic(settings, topics_for(settings).tx_state, lambda r: raw.append((r.key.decode(), r.value)))
    return tx_state.fold_changelog(default_codec(), raw)


async def transactions_in_flight(settings: Settings) -> dict[str, SagaSnapshot]:
    return (await changelog(settings)).states


def coordinator_reads(topics: Topics, positions: list[InputPosition]) -> list[str]:
    """The coordinator's input topics (`Topics.coordinator_inputs`), and the deadlock verdicts when its
    changelog shows it reads them (only when co-partitioned with the intents: interactive_inputs.py)."""
    verdicts = [topics.deadlocks] if any(p["topic"] == topics.deadlocks for p in positions) else []
    return [*topics.coordinator_inputs(), *verdicts]


async def coordinator_backlog(settings: Settings, positions: list[InputPosition]) -> dict[str, int] | str:
    """Per input topic, the offsets the coordinator has not folded (projections/status.py); why not, as
    text, when the end offsets cannot be read."""
    topics = topics_for(settings)
    reader = make_reader(settings, "polycommit-inspect")
    try:
        await reader.start()
        tps = [tp for topic in coordinator_reads(topics, positions) for tp in await topic_partitions(reader, topic)]
        ends = await reader.end_offsets(tps) if tps else {}
    except KafkaError as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    finally:
        await reader.stop()
    return status_fold.backlog(positions, {(tp.topic, tp.partition): end for tp, end in ends.items()})


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


def describe_backlog(backlog: dict[str, int] | str) -> str:
    if isinstance(backlog, str):
        return f"coordinator backlog: {backlog}"
    shown = ", ".join(f"{topic.rsplit('.', 1)[-1]} {count}" for topic, count in sorted(backlog.items()))
    return f"coordinator backlog (offsets not folded yet): {shown}"


async def print_status(settings: Settings, *, as_json: bool) -> int:
    folded = await changelog(settings)
    report = status_fold.report(folded.states)
    report["coordinator_members"] = await coordinator_members(settings)
    report["coordinator_backlog"] = await coordinator_backlog(settings, folded.positions)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        console = Console()
        console.print(describe_members(report["coordinator_members"]))
        console.print(describe_backlog(report["coordinator_backlog"]))
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
