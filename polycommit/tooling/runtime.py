"""Run the coordinator and store consumers as asyncio tasks of one process (`polycommit run all`).

In production each part may run as its own process (`polycommit run coordinator`, `polycommit consumer
postgres`, ...) and scale by adding members to its consumer group; for the demo, the benchmark and the
tests they share one event loop. `Runtime` starts them, waits until each has joined its group, and stops
them cleanly; a part that crashes is reported, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consumers.base import Participant
from consumers.worker import StoreWorker
from orchestrator.saga import SagaPolicy
from orchestrator.service import CoordinatorService
from polycommit import tracing
from polycommit.config import Settings
from polycommit.errors import UnknownStoreError
from polycommit.events import STORES
from polycommit.tooling import kafka_tuning

if TYPE_CHECKING:
    from orchestrator.lock_manager import LockManagerService

log = logging.getLogger(__name__)

_PARTICIPANTS = {
    "postgres": ("consumers.postgres", "PostgresParticipant"),
    "qdrant": ("consumers.qdrant", "QdrantParticipant"),
    "neo4j": ("consumers.neo4j", "Neo4jParticipant"),
}


def participant_for(store: str, settings: Settings) -> Participant:
    """The adapter of one store; imported lazily so a process loads only the drivers it uses."""
    try:
        module_name, class_name = _PARTICIPANTS[store]
    except KeyError:
        raise UnknownStoreError(f"unknown store {store!r}; polycommit has {', '.join(STORES)}") from None
    participant: Participant = getattr(importlib.import_module(module_name), class_name)(settings)
    return participant


@dataclass
class Runtime:
    settings: Settings
    stores: Sequence[str] = STORES
    coordinator: bool = True
    detector: bool = False  # the deadlock detector (a faust app): `polycommit run all|detector`
    lock_manager: bool = False  # the lock manager partitioned by key: `polycommit run lock-manager`
    policy: SagaPolicy | None = None
    batch_size: int = 500
    observe: tracing.Observe = tracing.ignore  # the parts' metrics (polycommit.tooling.metrics)
    service: CoordinatorService | None = None
    lock_manager_service: LockManagerService | None = None  # when it runs here
    workers: dict[str, StoreWorker] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, timeout: float = 60.0) -> Runtime:
        kafka_tuning.apply()  # a runtime is polycommit's own process (or part of one), whoever starts it
        self._stop = asyncio.Event()  # a runtime may be started again after stop()
        self.workers = {}
        readies: list[tuple[str, asyncio.Event]] = []
        if self.coordinator:
            # Each part is its own Kafka principal (when the secrets name one), with only the ACLs it needs.
            self.service = CoordinatorService(self.settings.as_role("coordinator"), self.policy, observe=self.observe)
            ready = asyncio.Event()
            readies.append(("coordinator", ready))
            self._tasks.append(asyncio.create_task(self.service.run(self._stop, ready), name="coordinator"))
        if self.detector:
            from orchestrator.detector import Detector  # faust is loaded only by processes that detect

            ready = asyncio.Event()
            readies.append(("detector", ready))
            self._tasks.append(asyncio.create_task(Detector(self.settings).run(self._stop, ready), name="detector"))
        if self.lock_manager:
            from orchestrator.lock_manager import LockManagerService

            ready = asyncio.Event()
            readies.append(("lock-manager", ready))
            # A part of coordination: it runs as the coordinator principal (polycommit/acls.py).
            manager = self.lock_manager_service = LockManagerService(self.settings.as_role("coordinator"))
            self._tasks.append(asyncio.create_task(manager.run(self._stop, ready), name="lock-manager"))
        for store in self.stores:
            participant = participant_for(store, self.settings)
            worker = StoreWorker(
                self.settings.as_role("consumer"), participant, batch_size=self.batch_size, observe=self.observe
            )
            self.workers[store] = worker
            ready = asyncio.Event()
            readies.append((store, ready))
            self._tasks.append(asyncio.create_task(worker.run(self._stop, ready), name=f"{store}-worker"))
        try:
            for name, ready in readies:
                await self._await_ready(name, ready, timeout)
        except BaseException:
            await self.stop()  # the parts that did start must not outlive a failed start
            raise
        return self

    async def _await_ready(self, name: str, ready: asyncio.Event, timeout: float) -> None:
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait([waiter, *self._tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            for task in done:
                task.result()  # a part that died while starting raises here, with its own error
            raise TimeoutError(f"{name} did not start within {timeout}s")

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(task, 30)
                except TimeoutError:
                    task.cancel()
        self._tasks.clear()

    async def wait(self) -> None:
        """Run until stopped or until a part fails (its exception propagates)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

    def stats(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self.service is not None:
            report["coordinator"] = vars(self.service.stats)
        for store, worker in self.workers.items():
            report[store] = vars(worker.stats)
        if self.lock_manager_service is not None:
            report["lock-manager"] = vars(self.lock_manager_service.stats)
        return report

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
