"""`polycommit recover`: finish every incomplete transaction now, and report what was done (P6).

Recovery needs no operator: a coordinator that starts folds its changelog and picks up every transaction
in flight. This command does the same on demand, watching: it reads which transactions the log says are
in flight, runs the coordinator and the store consumers (unless they already run elsewhere), and waits
until each of those transactions has reported a result, or is stuck and said so.
"""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer

from polycommit.bus import create_topics, make_reader, topic_partitions, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.runtime import Runtime
from projections import recovery as fold
from projections.recovery import RecoveryReport

__all__ = ["RecoveryReport", "print_report", "recover", "run_recover"]


async def _results_from_now(settings: Settings) -> AIOKafkaConsumer:
    """A reader of the results and decisions topics positioned at their current ends, before anything runs."""
    reader = make_reader(settings, "polycommit-recover")
    await reader.start()
    topics = topics_for(settings)
    tps = [*await topic_partitions(reader, topics.results), *await topic_partitions(reader, topics.decisions)]
    reader.assign(tps)
    await reader.seek_to_end(*tps)
    for tp in tps:
        await reader.position(tp)  # fix the start now: results from here on are the recovery's
    return reader


async def prepared_batches(settings: Settings) -> dict[str, list[str]]:
    """Our prepared PostgreSQL transactions now: gid -> the transactions it holds (from the membership
    table; a one-step gid of earlier versions names none)."""
    import asyncpg

    from consumers.postgres import twophase

    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        space = twophase.space_of(settings.topic_prefix)
        gids = [r[0] for r in await conn.fetch(twophase.PREPARED_GIDS, f"{twophase.GID_PREFIX}{space}_")]
        found: dict[str, list[str]] = {gid: [] for gid in gids}
        if gids and await conn.fetchval("SELECT to_regclass($1)", twophase.MEMBERS_TABLE) is not None:
            for gid, tx_id, _step in await conn.fetch(twophase.MEMBERS_OF, gids):
                found[gid].append(tx_id)
        return {gid: sorted(set(txs)) for gid, txs in found.items()}
    finally:
        await conn.close()


async def _settled_meanwhile(settings: Settings, before: dict[str, list[str]]) -> list[dict[str, str]]:
    """The prepared gids open at the start that are gone now, with what their members' decisions made of
    them: how `recover --external` reports the settling done by participants running elsewhere."""
    from consumers.postgres.settlement import decisions_by_tx

    now = await prepared_batches(settings)
    gone = {gid: txs for gid, txs in before.items() if gid not in now}
    decisions = await decisions_by_tx(settings) if gone else {}
    settled = []
    for gid, txs in sorted(gone.items()):
        verdicts = [decisions.get(tx) for tx in txs]
        action = "COMMIT" if txs and all(v == "COMMIT" for v in verdicts) else "ROLLBACK"
        why = "COMMIT" if action == "COMMIT" else ("ABORT" if "ABORT" in verdicts else "presumed abort")
        settled.append({"gid": gid, "action": action, "why": why, "transactions": ",".join(txs)})
    return settled


async def recover(settings: Settings, *, external: bool = False, wait: float = 300.0) -> RecoveryReport:
    await create_topics(settings)
    started = time.monotonic()
    report = fold.begin(await transactions_in_flight(settings))
    prepared = await prepared_batches(settings)
    reader = await _results_from_now(settings)
    runtime = None if external or not fold.waiting(report) else await Runtime(settings).start()
    codec = default_codec()
    try:
        deadline = time.monotonic() + wait
        while fold.waiting(report) and time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    decoded = codec.decode(record.value)
                    if decoded.event_type == "Decision":
                        fold.decided(report, decoded.record["tx_id"], decoded.record["outcome"])
                    elif decoded.event_type == "TransactionResult":
                        fold.record(report, decoded.record["tx_id"], str(decoded.record["status"]))
    finally:
        await reader.stop()
        if runtime is not None:
            report.settled = list(getattr(runtime.workers["postgres"].participant, "settled", []))
            await runtime.stop()
    known = {entry["gid"] for entry in report.settled}
    report.settled.extend(e for e in await _settled_meanwhile(settings, prepared) if e["gid"] not in known)
    return fold.finish(report, time.monotonic() - started)


def print_report(report: RecoveryReport) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"in flight in the log: {len(report.in_flight)} {fold.count(report.in_flight.values())}")
    console.print(f"finished by recovery: {fold.count(report.finished.values())} in {report.seconds:.1f} s")
    if report.decided or report.settled:
        console.print(f"two-phase commit: decided {fold.count(report.decided.values())}")
        for gid in report.settled:
            members = f" for {gid['transactions']}" if gid.get("transactions") else ""
            console.print(f"  settled prepared {gid['gid']}: {gid['action']} ({gid['why']}){members}")
    if report.still_stuck:
        console.print(f"[red]stuck (compensation keeps failing; see `polycommit status`): {report.still_stuck}[/]")
    if report.unfinished:
        console.print(f"[red]no result yet: {report.unfinished}[/]")


async def run_recover(settings: Settings, *, external: bool, wait: float, as_json: bool) -> int:
    report = await recover(settings, external=external, wait=wait)
    if as_json:
        import json

        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1
