"""The one batch planner every store participant shares: what each command of a batch may do, and in which groups.

`plan_batch` applies the exactly-once table of `consumers.base.plan` to every command in order, with the
markers read from the store plus an *in-batch view*: a command planned to write its marker counts as
recorded for the commands after it (a redelivered EXECUTE later in the batch is ALREADY_APPLIED; a
COMPENSATE after its EXECUTE applies, and takes its before-image from that EXECUTE once it has run).
`batch_groups` splits the commands that write into consecutive groups whose keys are disjoint, so each
group may be applied with shared statements while the result stays that of applying the batch in order.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from consumers.base import Marker, Plan, generations, plan
from consumers.command import TypedCommand

_WRITES_MARKER = frozenset({Plan.APPLY_EXECUTE, Plan.APPLY_COMPENSATION, Plan.RECORD_NOOP_COMPENSATION})
_WRITES_DATA = frozenset({Plan.APPLY_EXECUTE, Plan.APPLY_COMPENSATION})
# What plan() sees of a marker that a command earlier in the batch will write: recorded and done.
_PLANNED = Marker(before_image=None, pending=False)


@dataclass(slots=True)
class Planned:
    """One command of a batch and what the markers allow it to do (made once, never changed).

    `execute` is the step's EXECUTE marker as read from the store and `own` this command's own marker
    (None when absent, or when the deciding marker is planned in this batch). `earlier` is the position
    of that batch command: for APPLY_COMPENSATION, the EXECUTE whose before-image to restore; for
    ALREADY_APPLIED, the twin whose outcome this one repeats.
    """

    position: int
    command: TypedCommand
    decision: Plan
    execute: Marker | None
    own: Marker | None
    earlier: int | None = None

    @property
    def writes_marker(self) -> bool:
        return self.decision in _WRITES_MARKER

    @property
    def writes_data(self) -> bool:
        return self.decision in _WRITES_DATA

    @property
    def is_execute(self) -> bool:
        return self.command.action == "EXECUTE"


def plan_batch(commands: Sequence[TypedCommand], markers: Mapping[str, Marker]) -> list[Planned]:
    """Decide every command in order, as if the earlier ones had already been applied."""
    view: dict[str, Marker | int] = dict(markers)
    planned: list[Planned] = []
    for position, command in enumerate(commands):
        execute, compensate = view.get(command.execute_id), view.get(command.compensate_id)
        decision = plan(command.source, _seen(execute), _seen(compensate))
        own = execute if command.action == "EXECUTE" else compensate
        earlier: int | None = None
        if decision is Plan.APPLY_COMPENSATION and isinstance(execute, int):
            earlier = execute
        elif decision is Plan.ALREADY_APPLIED and isinstance(own, int):
            earlier = own
        step = Planned(
            position,
            command,
            decision,
            execute if isinstance(execute, Marker) else None,
            own if isinstance(own, Marker) else None,
            earlier,
        )
        if step.writes_marker:
            view[command.own_id] = position
        planned.append(step)
    return planned


def _seen(entry: Marker | int | None) -> Marker | None:
    return _PLANNED if isinstance(entry, int) else entry


def batch_groups(
    planned: Sequence[Planned],
    writes: Callable[[Planned], Sequence[str]],
    *,
    reads: Callable[[Planned], Sequence[str]] = lambda _: (),
    alone: Callable[[Planned], bool] = lambda _: False,
) -> list[list[Planned]]:
    """The commands that write, split into consecutive groups in which no key repeats.

    `writes` names the keys a command writes (its step key is added, so a step's EXECUTE and COMPENSATE
    never share a group). `reads` names keys it only needs to exist: they conflict only with keys
    written in the same run (e.g. a relationship after the command that creates its end node).
    A command for which `alone` holds (a raw statement, whose keys are unknown) is a group of its own.
    """
    active = [p for p in planned if p.writes_marker]
    groups: list[list[Planned]] = []
    run: list[Planned] = []

    def flush() -> None:
        wrote = [writes(p) for p in run]
        written = {k for w in wrote for k in w}
        keys = {i: [p.command.step_key, *wrote[i], *(k for k in reads(p) if k in written)] for i, p in enumerate(run)}
        groups.extend([run[i] for i in g] for g in generations([p.command.source for p in run], keys))
        run.clear()

    for p in active:
        if alone(p):
            flush()
            groups.append([p])
        else:
            run.append(p)
    flush()
    return [g for g in groups if g]
