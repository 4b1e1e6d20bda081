"""Read-only views of the log for operators: transactions in flight or stuck, and dead letters.

Both are folds over a topic read from offset 0 to its current end with a group-less consumer, so looking
never moves anybody's offsets.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from polycommit.bus import read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.events import SagaSnapshot
from projections import tx_state


async def transactions_in_flight(settings: Settings) -> dict[str, SagaSnapshot]:
    raw: list[tuple[str, bytes | None]] = []
    await read_topic(settings, topics_for(settings).tx_state, lambda r: raw.append((r.key.decode(), r.value)))
    return tx_state.fold_raw(default_codec(), raw)[0]


def _describe(snapshot: SagaSnapshot) -> dict[str, Any]:
    error = snapshot["error"]
    return {
        "tx_id": snapshot["intent"]["tx_id"],
        "name": snapshot["intent"]["name"],
        "phase": snapshot["phase"],
        "step": snapshot["current"],
        "attempt": snapshot["attempt"],
        "steps": [f"{s['index']}:{s['store']}:{s['status']}" for s in snapshot["steps"]],
        "error": None if error is None else f"{error['error_class']}: {error['message']}",
        "started_at_ms": snapshot["started_at_ms"],
    }


async def print_status(settings: Settings, *, as_json: bool) -> int:
    state = await transactions_in_flight(settings)
    stuck = tx_state.stuck(state)
    report: dict[str, Any] = {
        "in_flight": tx_state.summary(state),
        "stuck": [_describe(s) for s in stuck],
        "transactions": [_describe(s) for s in state.values()],
    }
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        console = Console()
        console.print(f"in flight: {sum(report['in_flight'].values())} {report['in_flight']}")
        table = Table(title="stuck transactions (compensation keeps failing; still retried)")
        for column in ("tx_id", "name", "step", "attempt", "error"):
            table.add_column(column)
        for row in report["stuck"]:
            table.add_row(row["tx_id"], row["name"], str(row["step"]), str(row["attempt"]), row["error"] or "")
        console.print(table)
    return 1 if stuck else 0


async def dead_letters(settings: Settings, limit: int | None = None) -> list[dict[str, Any]]:
    codec = default_codec()
    letters: list[dict[str, Any]] = []

    def handle(record: Any) -> None:
        try:
            letter = codec.decode_as(record.value, "DeadLetter")
        except CodecError:
            return
        letter["payload"] = f"{letter['payload_size']} bytes"
        letter["key"] = letter["key"].decode(errors="replace") if letter["key"] else None
        letters.append(letter)

    await read_topic(settings, topics_for(settings).dead_letters, handle)
    letters.sort(key=lambda letter: letter["at_ms"])
    return letters[-limit:] if limit else letters


async def print_dead_letters(settings: Settings, *, limit: int, as_json: bool) -> int:
    letters = await dead_letters(settings, limit)
    if as_json:
        print(json.dumps(letters, indent=2, sort_keys=True, default=str))
        return 0
    table = Table(title=f"dead letters (last {limit})")
    for column in ("topic/partition/offset", "error", "tx", "consumer"):
        table.add_column(column)
    for letter in letters:
        where = f"{letter['original_topic']}/{letter['partition']}/{letter['offset']}"
        table.add_row(
            where, f"{letter['error_class']}: {letter['error_message'][:80]}", letter["tx_id"] or "", letter["consumer"]
        )
    Console().print(table)
    return 0
