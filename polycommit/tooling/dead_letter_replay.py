"""`polycommit dead-letters replay`: publish dead-lettered records again, once each, after their cause is fixed.

A dead letter's id is its place in the dead-letter topic, `dead-letters/<partition>/<offset>`. A replay
sends the letter's original bytes to its original topic and partition with its original key and the header
`polycommit-replay-of: <id>`; a replay that fails again becomes exactly one new dead letter naming the id
(its `replay_of`), and nothing replays by itself, so there is no loop. Each replay is recorded as a
`dead_letter_replayed` alert; replaying an id that has one is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer

from polycommit.bus import MAX_RECORD_BYTES, read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.deadletters import REPLAY_HEADER
from polycommit.errors import CodecError
from polycommit.events import Alert, DeadLetter, now_ms
from polycommit.kafka_client import client_security

REPLAYED_ALERT = "dead_letter_replayed"


def add_arguments(letters: argparse.ArgumentParser) -> None:
    """`dead-letters [list|replay]`: the replay's selection options (registered by cli.py)."""
    letters.add_argument("action", nargs="?", choices=["list", "replay"], default="list")
    letters.add_argument("--id", action="append", default=[], dest="ids", metavar="ID", help="dead-letters/P/O")
    letters.add_argument("--since", default=None, metavar="ISO-TIME", help="letters written at or after this time")
    letters.add_argument("--all", action="store_true", help="every dead letter")
    letters.add_argument("--force", action="store_true", help="replay letters that were replayed before")


@dataclass(frozen=True)
class Positioned:
    id: str
    letter: DeadLetter


def letter_id(partition: int, offset: int) -> str:
    return f"dead-letters/{partition}/{offset}"


def since_ms(text: str) -> int:
    """An ISO time (naive = UTC) as epoch milliseconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def select(letters: Iterable[Positioned], ids: list[str], since: int | None, every: bool) -> list[Positioned]:
    if every:
        return list(letters)
    if since is not None:
        return [p for p in letters if p.letter["at_ms"] >= since]
    wanted = set(ids)
    return [p for p in letters if p.id in wanted]


def refusal(positioned: Positioned, replayed: Mapping[str, str], force: bool) -> str | None:
    letter = positioned.letter
    if letter["payload_size"] > len(letter["payload"]):
        return f"the letter keeps {len(letter['payload'])} of the record's {letter['payload_size']} bytes"
    if positioned.id in replayed and not force:
        return f"replayed before ({replayed[positioned.id]}); --force replays it again"
    return None


async def read_letters(settings: Settings) -> list[Positioned]:
    codec = default_codec()
    found: list[Positioned] = []

    def handle(record: Any) -> None:
        try:
            letter: DeadLetter = codec.decode_as(record.value, "DeadLetter")  # type: ignore[assignment]
        except CodecError:
            return
        found.append(Positioned(letter_id(record.partition, record.offset), letter))

    await read_topic(settings, topics_for(settings).dead_letters, handle)
    return found


async def read_replayed(settings: Settings) -> dict[str, str]:
    """Dead-letter id -> where its last replay went, from the `dead_letter_replayed` alerts."""
    codec = default_codec()
    replayed: dict[str, str] = {}

    def handle(record: Any) -> None:
        try:
            alert = codec.decode_as(record.value, "Alert")
        except CodecError:
            return
        if alert["kind"] == REPLAYED_ALERT:
            letter, _, where = alert["message"].partition(" -> ")
            replayed[letter] = where

    await read_topic(settings, topics_for(settings).alerts, handle)
    return replayed


async def replay(
    settings: Settings, ids: list[str], *, since: int | None = None, every: bool = False, force: bool = False
) -> list[dict[str, Any]]:
    """Replay the selected letters; one report row per letter (replayed, or refused and why)."""
    letters = await read_letters(settings)
    known = {p.id for p in letters}
    rows: list[dict[str, Any]] = [
        {"id": i, "status": "refused", "reason": "no such dead letter"} for i in ids if i not in known
    ]
    chosen = select(letters, ids, since, every)
    if not chosen:
        return rows
    replayed = await read_replayed(settings)
    producer = AIOKafkaProducer(
        **client_security(settings),
        acks="all",
        enable_idempotence=True,
        max_request_size=MAX_RECORD_BYTES,
    )
    await producer.start()
    try:
        for positioned in chosen:
            reason = refusal(positioned, replayed, force)
            if reason is not None:
                rows.append({"id": positioned.id, "status": "refused", "reason": reason})
                continue
            rows.append(await _replay_one(settings, producer, positioned))
    finally:
        await producer.stop()
    return rows


async def _replay_one(settings: Settings, producer: AIOKafkaProducer, positioned: Positioned) -> dict[str, Any]:
    letter = positioned.letter
    topic = letter["original_topic"]
    partitions = await producer.partitions_for(topic)
    # The original partition keeps the record with its transaction's other records; a key alone would
    # choose the same one unless the topic's partitions changed since.
    partition = letter["partition"] if letter["partition"] in partitions else None
    headers = [(REPLAY_HEADER, positioned.id.encode())]
    sent = await producer.send_and_wait(
        topic, letter["payload"], key=letter["key"], partition=partition, headers=headers
    )
    where = f"{topic}/{sent.partition}/{sent.offset}"
    alert: Alert = {
        "kind": REPLAYED_ALERT,
        "tx_id": letter["tx_id"] or positioned.id,
        "message": f"{positioned.id} -> {where}",
        "at_ms": now_ms(),
    }
    alerts = topics_for(settings).alerts
    await producer.send_and_wait(alerts, default_codec().encode("Alert", alert), key=alert["tx_id"].encode())
    return {"id": positioned.id, "status": "replayed", "to": where, "tx_id": letter["tx_id"]}


async def run(settings: Settings, args: argparse.Namespace) -> int:
    if not (args.ids or args.since or args.all):
        print("polycommit dead-letters replay: name letters with --id, --since or --all", file=sys.stderr)
        return 2
    try:
        since = since_ms(args.since) if args.since else None
    except ValueError:
        print(f"polycommit dead-letters replay: --since wants an ISO time, got {args.since!r}", file=sys.stderr)
        return 2
    rows = await replay(settings, args.ids, since=since, every=args.all, force=args.force)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        for row in rows:
            detail = row.get("to") or row.get("reason")
            print(f"{row['id']:32} {row['status']:9} {detail}")
    return 1 if any(row["status"] == "refused" for row in rows) else 0
