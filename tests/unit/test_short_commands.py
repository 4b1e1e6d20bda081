"""`servers.process.run`, the helper that runs short commands (pg_ctl, initdb, psql), on both event loops the
CLI may use: it returns when the command exits, with its output, even when the command leaves a daemon
behind (`pg_ctl start` does). Under uvloop a daemon kept the output pipe open and the helper waited out
its limit: 65 s per PostgreSQL restart in chaos."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from polycommit.tooling.servers.process import run

# The daemon outlives the command by far longer than the limit: waiting for it would time the run out.
DAEMONIZING = ["sh", "-c", "sleep 30 </dev/null >/dev/null 2>&1 & echo started; echo to-stderr >&2"]
LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_command_that_leaves_a_daemon_is_done_when_it_exits_with_its_output(loop: str) -> None:
    code, out = LOOPS[loop](run(DAEMONIZING, limit_s=10))
    assert code == 0, out  # -1 and "timed out" when the helper waited for the daemon
    assert out.split() == ["started", "to-stderr"]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_input_reaches_the_command_and_a_failure_keeps_its_exit_code(loop: str) -> None:
    assert LOOPS[loop](run(["cat"], input_text="hello\n")) == (0, "hello\n")
    code, out = LOOPS[loop](run(["sh", "-c", "echo nope; exit 3"]))
    assert (code, out) == (3, "nope\n")


def test_a_command_past_its_limit_is_killed_and_reported() -> None:
    code, out = asyncio.run(run(["sleep", "30"], limit_s=0.2))
    assert code == -1 and out.startswith("timed out after 0 s: sleep 30")
