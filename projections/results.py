"""The statuses each transaction reported, as a fold over `polycommit.results` and a client's own replies.

A transaction may report more than once (a replayed intent, a client that heard one result and the log
that holds another): the fold keeps every distinct status in arrival order, a repeat of the last one
counted once, so that two different final results stay visible to whoever judges them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

TERMINAL = ("completed", "compensated", "failed", "committed", "aborted")


def heard(statuses: list[str], status: str) -> list[str]:
    """One more status of a transaction (lower-cased); a repeat of the last one is not counted twice."""
    status = status.lower()
    if not statuses or statuses[-1] != status:
        statuses.append(status)
    return statuses


def fold(records: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(tx id, status) records in log order -> the statuses of each transaction, in that order."""
    state: dict[str, list[str]] = {}
    for tx_id, status in records:
        heard(state.setdefault(tx_id, []), status)
    return state


def final(statuses: Sequence[str]) -> str | None:
    """The last terminal status, else the last status (e.g. `stuck`), else None."""
    terminal = [s for s in statuses if s in TERMINAL]
    if terminal:
        return terminal[-1]
    return statuses[-1] if statuses else None


def merge(client: Mapping[str, list[str]], from_log: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """What a client heard, corrected by the log: the log is authoritative and ordered per transaction; a
    status the client heard that the log does not have (impossible unless results are lost) is kept,
    after the log's own."""
    merged = dict(client)
    for tx_id, statuses in from_log.items():
        extra = [s for s in client.get(tx_id, []) if s not in statuses]
        merged[tx_id] = statuses + extra
    return merged
