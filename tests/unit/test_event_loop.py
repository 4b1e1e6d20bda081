"""The processes' event loop: uvloop by default, the standard loop on request, a typed error otherwise; and
the CLI runs every command on the chosen one."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from polycommit.errors import InvalidOperationError
from polycommit.tooling import cli
from polycommit.tooling.event_loop import event_loop_factory, running_loop_name


def loop_of_a_run(factory: object) -> str:
    async def name() -> str:
        return running_loop_name()

    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
        return runner.run(name())


def test_uvloop_is_the_default_and_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYCOMMIT_EVENT_LOOP", raising=False)
    assert loop_of_a_run(event_loop_factory()) == "uvloop"
    assert running_loop_name() == "uvloop"  # outside a loop: the one a process would get
    monkeypatch.setenv("POLYCOMMIT_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None
    assert loop_of_a_run(event_loop_factory()) == "asyncio"
    assert running_loop_name() == "asyncio"


def test_an_unknown_loop_is_a_typed_error_naming_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYCOMMIT_EVENT_LOOP", "tokio")
    with pytest.raises(InvalidOperationError, match="uvloop, asyncio"):
        event_loop_factory()


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_the_cli_runs_its_command_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    seen: list[str] = []

    async def dispatch(args: argparse.Namespace) -> int:
        seen.append(running_loop_name())
        return 0

    monkeypatch.setenv("POLYCOMMIT_EVENT_LOOP", choice)
    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["status"]) == 0
    assert seen == [choice]
