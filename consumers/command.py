"""A store command with its operations parsed once: what the worker hands to a participant.

The worker parses every command as it arrives (`parse_command`); a command that does not parse fails
there, alone, with a typed error, and the participants only ever see typed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polycommit.errors import InvalidOperationError, UnsupportedError
from polycommit.events import Store, StoreCommand
from polycommit.parsed import ParsedOperation, keys_of, parse_operation


def marker_id(tx_id: str, step_index: int, action: str) -> str:
    return f"{tx_id}/{step_index}/{action}"


@dataclass(slots=True)
class TypedCommand:
    """A StoreCommand (`source`, as it travelled) with its operation and compensation parsed; never changed.

    The marker ids and the step key are computed once, here: planning reads them for every command of
    every batch. (A plain slotted class: a frozen one pays object.__setattr__ for every field.)
    """

    source: StoreCommand
    operation: ParsedOperation
    compensation: ParsedOperation | None
    execute_id: str = field(init=False, compare=False)
    compensate_id: str = field(init=False, compare=False)
    own_id: str = field(init=False, compare=False)
    # Orders a step's EXECUTE and COMPENSATE within a batch: they never share a generation.
    step_key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        prefix = f"{self.source['tx_id']}/{self.source['step_index']}/"  # marker_id's format
        self.execute_id = prefix + "EXECUTE"
        self.compensate_id = prefix + "COMPENSATE"
        self.own_id = prefix + self.source["action"]
        self.step_key = "step:" + prefix[:-1]

    @property
    def tx_id(self) -> str:
        return self.source["tx_id"]

    @property
    def step_index(self) -> int:
        return self.source["step_index"]

    @property
    def action(self) -> str:
        return self.source["action"]

    def lock_keys(self) -> list[str]:
        """What the command may write: its operation's keys, and its declared compensation's."""
        keys = keys_of(self.operation)
        if self.compensation is not None:
            keys += keys_of(self.compensation)
        return keys


def parse_command(command: StoreCommand, store: Store, max_payload_bytes: int) -> TypedCommand:
    """Parse and validate a command for `store`; a typed error for anything no retry can fix."""
    if command["action"] not in ("EXECUTE", "COMPENSATE", "PREPARE", "COMMIT", "ABORT"):
        raise UnsupportedError(f"the {store} participant does not run {command['action']}")
    parsed: list[ParsedOperation | None] = []
    for op in (command["operation"], command["compensation"]):
        if op is None:
            parsed.append(None)
            continue
        if op["store"] != store:
            raise InvalidOperationError(f"a {op['store']} operation arrived at the {store} consumer")
        parsed.append(parse_operation(op, max_payload_bytes))
    operation, compensation = parsed
    assert operation is not None  # the schema makes `operation` required
    return TypedCommand(command, operation, compensation)
