"""`polycommit tx show|retry|resolve`: one transaction read whole from the log, and an operator's orders about it.

`show` reads the partitions that hold the transaction (every record is keyed by tx id; lock events, keyed
by resource, are read whole and matched on their tx_id field) with a group-less reader, so looking moves
nobody's offsets. `retry` and `resolve` publish an `OperatorCommand` to the intents topic keyed by tx id
(so the coordinator member owning the transaction receives it in order with its other inputs), then wait
for the coordinator's answer: an `operator` alert (carried out) or an `operator_refused` alert (why not).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from orchestrator.operator import AUDIT_ALERT, REFUSED_ALERT, describe
from polycommit.bus import Outgoing, Publisher, make_reader, read_assigned, topic_partitions, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.events import STORES, OperatorAction, OperatorCommand, now_ms
from polycommit.partitioning import partition_of
from projections.tx_history import LogRecord, concerns, history, stores_touched


def add_parser(sub: Any) -> None:
    """The `tx` command family's arguments (registered by cli.py)."""
    tx = sub.add_parser("tx", help="one transaction: its events (show), or an operator's retry / resolve")
    actions = tx.add_subparsers(dest="tx_action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the transaction's events from the log, in order")
    show.add_argument("tx_id")
    show.add_argument("--json", action="store_true")
    retry = actions.add_parser("retry", help="send the command waiting for its backoff now (a stuck compensation)")
    resolve = actions.add_parser("resolve", help="record that step N was repaired by hand; compensation goes on")
    resolve.add_argument("--step", type=int, required=True, help="the step being compensated")
    resolve.add_argument("--note", default="", help="what was done, for the audit")
    for order in (retry, resolve):
        order.add_argument("tx_id")
        order.add_argument("--operator", default=None, help="who (default $USER)")
        order.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the coordinator's answer")
        order.add_argument("--json", action="store_true")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.tx_action == "show":
        return await print_history(settings, args.tx_id, as_json=args.json)
    action: OperatorAction = "RETRY" if args.tx_action == "retry" else "RESOLVE_STEP"
    command: OperatorCommand = {
        "tx_id": args.tx_id,
        "action": action,
        "step_index": getattr(args, "step", -1),
        "operator": args.operator or os.environ.get("USER") or getpass.getuser(),
        "note": getattr(args, "note", ""),
        "at_ms": now_ms(),
    }
    answer = await send_operator_command(settings, command, wait=args.wait)
    report = {"command": command, "answer": answer}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif answer is None:
        print(f"published; no coordinator answered within {args.wait:g} s (is one running?)", file=sys.stderr)
    else:
        print(f"{answer['kind']}: {answer['message']}")
    return 0 if answer is not None and answer["kind"] == "operator" else 1


# -- show ------------------------------------------------------------------------------------------


async def _assign_everything(reader: AIOKafkaConsumer, settings: Settings, tx_id: str) -> list[TopicPartition]:
    """The transaction's partition of every keyed topic, and every partition of the lock topic."""
    topics = topics_for(settings)
    keyed = [
        topics.intents,
        *(topics.commands(s) for s in STORES),
        topics.outcomes,
        topics.decisions,
        topics.alerts,
        topics.results,
        topics.dead_letters,
    ]
    wanted: list[TopicPartition] = []
    for topic in keyed:
        partitions = await topic_partitions(reader, topic)
        if partitions:
            wanted.append(partition_of(tx_id, partitions))
    wanted.extend(await topic_partitions(reader, topics.locks))
    return wanted


async def read_history(settings: Settings, tx_id: str) -> list[LogRecord]:
    codec = default_codec()
    found: list[LogRecord] = []

    def take(record: Any) -> None:
        key = record.key.decode(errors="replace") if record.key is not None else None
        try:
            decoded = codec.decode(record.value)
        except CodecError:
            return  # a poison record: its dead letter, if about this tx, is listed instead
        if concerns(decoded.event_type, decoded.record, key, tx_id):
            found.append(
                LogRecord(
                    record.topic, record.partition, record.offset, record.timestamp, decoded.event_type, decoded.record
                )
            )

    reader = make_reader(settings, "polycommit-tx-show")
    await reader.start()
    try:
        await read_assigned(reader, await _assign_everything(reader, settings, tx_id), take)
    finally:
        await reader.stop()
    return found


async def print_history(settings: Settings, tx_id: str, *, as_json: bool) -> int:
    events = history(await read_history(settings, tx_id))
    if not events:
        print(f"polycommit tx show: {tx_id} is not in the log", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"tx_id": tx_id, "stores": stores_touched(events), "events": events}, indent=2, default=str))
        return 0
    print(f"{tx_id}: stores {', '.join(stores_touched(events)) or '-'}")
    for event in events:
        fields = {k: v for k, v in event.items() if k not in ("at_ms", "topic", "position", "event") and v is not None}
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"{event['at_ms']} {event['event']:<18} {event['topic']}@{event['position']} {text}")
    return 0


# -- retry / resolve ---------------------------------------------------------------------------------


async def send_operator_command(settings: Settings, command: OperatorCommand, *, wait: float) -> dict[str, Any] | None:
    """Publish the command and return the coordinator's answer (an alert), or None after `wait` seconds."""
    topics = topics_for(settings)
    reader = make_reader(settings, "polycommit-tx-operator")
    await reader.start()
    try:
        partitions = await topic_partitions(reader, topics.alerts)
        tp = partition_of(command["tx_id"], partitions)
        reader.assign([tp])
        await reader.seek_to_end(tp)
        await reader.position(tp)  # fix the start now: an answer is published after this
        publisher = Publisher(settings, client_id="polycommit-tx")
        await publisher.start()
        try:
            await publisher.send(Outgoing(topics.intents, command["tx_id"], "OperatorCommand", command))
        finally:
            await publisher.stop()
        expected = describe(command)

        async def answer() -> dict[str, Any]:
            codec = default_codec()
            while True:
                for records in (await reader.getmany(tp, timeout_ms=500)).values():
                    for record in records:
                        try:
                            alert = codec.decode_as(record.value, "Alert")
                        except CodecError:
                            continue
                        if alert["kind"] in (AUDIT_ALERT, REFUSED_ALERT) and alert["message"].startswith(expected):
                            return alert

        try:
            return await asyncio.wait_for(answer(), wait)
        except TimeoutError:
            return None
    finally:
        await reader.stop()
