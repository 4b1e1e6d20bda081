"""Who may do what on polycommit's topics: one Kafka principal per role, and the ACLs that fit it.

Created with the topics (`create_topics`), by the admin principal, for the topic prefix in use, so that a
test session's or a chaos run's topics are guarded like the default ones. A broker without an authorizer
(PLAINTEXT, docker-compose) answers SECURITY_DISABLED, which is not an error: there is nothing to guard.

- client: writes intents; reads replies (without a group).
- coordinator: reads intents, outcomes, tx-state, deadlocks; writes commands.*, tx-state, decisions, results, replies,
  alerts, dead-letters, locks, and any reply topic under `<prefix>.`; group `<prefix>-coordinator`;
  transactional ids `<prefix>-coordinator-*`.
- coordinator, as the lock manager too (orchestrator/lock_manager.py, a part of coordination that only
  coordinators talk to): reads and writes lock-requests and lock-grants; group `<prefix>-lock-manager`.
- consumer (every store's): reads commands.*, decisions; writes outcomes, dead-letters; groups
  `<prefix>-<store>`.
- detector: reads locks; writes deadlocks; groups `<prefix>-detector*`.
- admin and broker: super users (`super.users`), for operators, the CLI, tests and topic creation.

So a client can publish an intent and read its reply, and nothing else: a COMPENSATE it writes straight
onto a command topic is refused (TOPIC_AUTHORIZATION_FAILED).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from aiokafka.errors import IncompatibleBrokerVersion, for_code
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest

if TYPE_CHECKING:
    from polycommit.bus import Topics

SECURITY_DISABLED = 54  # Kafka's error code when the broker runs without an authorizer


class Resource(IntEnum):
    TOPIC = 2
    GROUP = 3
    TRANSACTIONAL_ID = 5


class Pattern(IntEnum):
    LITERAL = 3
    PREFIXED = 4


class Operation(IntEnum):
    READ = 3
    WRITE = 4
    DESCRIBE = 8


ALLOW = 3
# The consumer groups the coordinator principal runs: the coordinators', the lock manager's.
COORDINATION_GROUPS = ("coordinator", "lock-manager")


@dataclass(frozen=True)
class Grant:
    """One ALLOW ACL: `principal` may `operation` on the resource, from any host."""

    principal: str
    resource: Resource
    name: str
    operation: Operation
    pattern: Pattern = Pattern.LITERAL


def _topics(principal: str, names: list[str], operation: Operation) -> list[Grant]:
    grants = []
    for name in names:
        grants += [
            Grant(principal, Resource.TOPIC, name, operation),
            Grant(principal, Resource.TOPIC, name, Operation.DESCRIBE),
        ]
    return grants


def role_grants(t: Topics, users: Mapping[str, str], stores: Sequence[str]) -> list[Grant]:
    """Every role's ACLs for the topics `t` names (pure: the table in the docstring); `users` maps a role
    to its principal's user name (roles without one get no ACLs)."""
    prefix = t.prefix
    commands = [t.commands(store) for store in stores]
    grants: list[Grant] = []
    if "client" in users:
        client = f"User:{users['client']}"
        grants += _topics(client, [t.intents], Operation.WRITE) + _topics(client, [t.replies], Operation.READ)
    if "coordinator" in users:
        who = f"User:{users['coordinator']}"
        reads = [t.intents, t.outcomes, t.tx_state, t.deadlocks, t.lock_requests, t.lock_grants]
        grants += _topics(who, reads, Operation.READ)
        writes = [*commands, t.tx_state, t.decisions, t.results, t.replies, t.alerts, t.dead_letters, t.locks]
        grants += _topics(who, [*writes, t.lock_requests, t.lock_grants], Operation.WRITE)
        grants += [Grant(who, Resource.GROUP, f"{prefix}-{group}", Operation.READ) for group in COORDINATION_GROUPS]
        # Results go to any reply topic an application creates under the deployment's prefix (admission
        # refuses polycommit's own topics as reply addresses, so this opens no command topic to a client).
        for op in (Operation.WRITE, Operation.DESCRIBE):
            grants.append(Grant(who, Resource.TOPIC, f"{prefix}.", op, Pattern.PREFIXED))
        for op in (Operation.WRITE, Operation.DESCRIBE):
            grants.append(Grant(who, Resource.TRANSACTIONAL_ID, f"{prefix}-coordinator-", op, Pattern.PREFIXED))
    if "consumer" in users:
        who = f"User:{users['consumer']}"
        grants += _topics(who, [*commands, t.decisions], Operation.READ)
        grants += _topics(who, [t.outcomes, t.dead_letters], Operation.WRITE)
        grants += [Grant(who, Resource.GROUP, f"{prefix}-{store}", Operation.READ) for store in stores]
    if "detector" in users:
        who = f"User:{users['detector']}"
        grants += _topics(who, [t.locks], Operation.READ) + _topics(who, [t.deadlocks], Operation.WRITE)
        grants.append(Grant(who, Resource.GROUP, f"{prefix}-detector", Operation.READ, Pattern.PREFIXED))
    return grants


async def grant(admin: Any, grants: list[Grant]) -> bool:
    """Create the ACLs through `admin` (an started AIOKafkaAdminClient of a super user); False when the
    broker has no authorizer. Creating an ACL that exists is a no-op on the broker, so this is idempotent.

    aiokafka has no ACL API, but it has the CreateAcls request (one binding per request here, v1: with
    the resource pattern type); its responses are checked here."""
    node = admin._client.get_random_node()
    for g in grants:
        response = await admin._client.send(node, CreateAclsRequest(*binding(g)))
        for error_code, message in response.creation_responses:
            if error_code == SECURITY_DISABLED:
                return False
            if error_code:
                raise for_code(error_code)(f"creating the ACL {g}: {message}")
    return True


async def revoke(admin: Any, grants: list[Grant]) -> list[Grant]:
    """Delete the ACLs of `grants` (a topic prefix's, with its topics) through `admin`; the grants the broker
    held. Without it every test's and chaos run's prefix leaves its ~60 ACLs behind: on a long-used broker
    (4 100 of them) a CreateAcls took 27 ms instead of 2, and a saga ~3-7 % more time. One DeleteAcls
    request, one exact filter per grant; a broker without an authorizer holds none."""
    if not grants:
        return []
    node = admin._client.get_random_node()
    response = await admin._client.send(node, _DeleteAcls([binding(g) for g in grants]))
    held = []
    for g, (error_code, message, matching) in zip(grants, response.filter_responses, strict=True):
        if error_code == SECURITY_DISABLED:
            return []
        if error_code:
            raise for_code(error_code)(f"deleting the ACL {g}: {message}")
        if matching:
            held.append(g)
    return held


Binding = tuple[int, str, int, str, str, int, int]  # resource type, name, pattern, principal, host, op, permission


def binding(g: Grant) -> Binding:
    """`g` as the fields of an ACL binding: what CreateAcls creates and an exact DeleteAcls filter matches."""
    return (int(g.resource), g.name, int(g.pattern), g.principal, "*", int(g.operation), ALLOW)


class _DeleteAcls(DeleteAclsRequest):  # type: ignore[misc]  # aiokafka's request classes are untyped
    """DeleteAcls with many filters (v1: with the resource pattern type): aiokafka's request carries one."""

    def __init__(self, filters: list[Binding]) -> None:
        self.filters = filters

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class.API_VERSION < 1:
            raise IncompatibleBrokerVersion("DeleteAcls v1 (resource pattern types) is needed")
        return request_struct_class(self.filters)
