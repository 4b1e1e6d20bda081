"""The local Kafka's configuration and ACL table, without a broker: what each mode and role gets."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from polycommit.acls import Grant, Operation, Pattern, Resource, role_grants
from polycommit.bus import Topics
from polycommit.config import KafkaCredentials, KafkaSettings, Settings, load_settings
from polycommit.tooling.servers import kafka_security
from polycommit.tooling.servers.kafka_config import cluster_nodes, node_properties, replication

USERS = {"client": "client", "coordinator": "coordinator", "consumer": "consumer", "detector": "detector"}
STORES = ("postgres", "qdrant", "neo4j")


def _settings(brokers: int, sasl: bool) -> Settings:
    roles = {r: KafkaCredentials(r, f"pw-{r}") for r in ("broker", "admin", *USERS)} if sasl else {}
    kafka = KafkaSettings(
        bootstrap="127.0.0.1:40000",
        controller_port=40001,
        brokers=brokers,
        security_protocol="SASL_PLAINTEXT" if sasl else "PLAINTEXT",
        credentials=roles.get("admin"),
        roles=roles,
    )
    return dataclasses.replace(load_settings(), kafka=kafka)


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_a_sasl_node_authenticates_every_listener_and_denies_by_default() -> None:
    settings = _settings(1, sasl=True)
    (node,) = cluster_nodes(settings)
    props = _properties(node_properties(settings, node, Path("/data"), "pw-broker"))

    assert props["listeners"] == "SASL_PLAINTEXT://127.0.0.1:40000,CONTROLLER://127.0.0.1:40001"
    assert props["listener.security.protocol.map"] == "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:broker;User:admin"
    assert "PLAINTEXT://" not in props["listeners"].replace("SASL_PLAINTEXT://", "")


def test_a_plaintext_node_has_no_authorizer() -> None:
    settings = _settings(1, sasl=False)
    (node,) = cluster_nodes(settings)
    props = _properties(node_properties(settings, node, Path("/data"), None))

    assert props["listeners"].startswith("PLAINTEXT://127.0.0.1:40000,")
    assert "authorizer.class.name" not in props


def test_three_nodes_form_one_quorum_with_three_replicas_and_two_in_sync() -> None:
    settings = _settings(3, sasl=True)
    nodes = cluster_nodes(settings)
    texts = [_properties(node_properties(settings, n, Path(f"/data/{n.name}"), "pw")) for n in nodes]

    assert [n.port for n in nodes] == [40000, 40001, 40002]
    assert [n.controller_port for n in nodes] == [40003, 40004, 40005]
    assert [n.name for n in nodes] == ["kafka", "kafka-2", "kafka-3"]
    assert {t["controller.quorum.voters"] for t in texts} == {"1@127.0.0.1:40003,2@127.0.0.1:40004,3@127.0.0.1:40005"}
    for props in texts:
        assert props["default.replication.factor"] == props["offsets.topic.replication.factor"] == "3"
        assert props["transaction.state.log.replication.factor"] == "3"
        assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"
        assert props["unclean.leader.election.enable"] == "false"
    assert [replication(n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]


def test_the_client_may_write_intents_and_read_replies_only() -> None:
    topics = Topics("p")
    grants = role_grants(topics, USERS, STORES)
    client = {(g.name, g.operation) for g in grants if g.principal == "User:client"}

    assert client == {
        ("p.intents", Operation.WRITE),
        ("p.intents", Operation.DESCRIBE),
        ("p.replies", Operation.READ),
        ("p.replies", Operation.DESCRIBE),
    }


def test_only_the_coordinator_writes_commands_and_only_consumers_write_outcomes() -> None:
    grants = role_grants(Topics("p"), USERS, STORES)

    def writers(topic: str) -> set[str]:
        return {g.principal for g in grants if g.name == topic and g.operation == Operation.WRITE}

    for store in STORES:
        assert writers(f"p.commands.{store}") == {"User:coordinator"}
    assert writers("p.outcomes") == {"User:consumer"}
    assert writers("p.deadlocks") == {"User:detector"}
    assert writers("p.intents") == {"User:client"}
    assert (
        Grant("User:coordinator", Resource.TRANSACTIONAL_ID, "p-coordinator-", Operation.WRITE, Pattern.PREFIXED)
        in grants
    )
    assert not role_grants(Topics("p"), {}, STORES), "roles without credentials get no ACLs"


def test_storage_is_reformatted_only_for_other_credentials_or_another_size() -> None:
    sasl, plain = _settings(1, sasl=True), _settings(1, sasl=False)
    formatted = kafka_security.format_digest(sasl, cluster_nodes(sasl))
    legacy = {"brokers": 1, "security": "plaintext"}  # what storage without a marker was

    assert kafka_security.compatible(formatted, kafka_security.format_digest(sasl, cluster_nodes(sasl)))
    assert kafka_security.compatible(formatted, kafka_security.format_digest(plain, cluster_nodes(plain)))
    assert not kafka_security.compatible(legacy, formatted)
    changed = dataclasses.replace(sasl.kafka, roles={**sasl.kafka.roles, "admin": KafkaCredentials("admin", "new")})
    renewed = dataclasses.replace(sasl, kafka=changed)
    assert not kafka_security.compatible(formatted, kafka_security.format_digest(renewed, cluster_nodes(renewed)))
    three = _settings(3, sasl=True)
    assert not kafka_security.compatible(formatted, kafka_security.format_digest(three, cluster_nodes(three)))
    assert "pw-admin" not in str(formatted)


def test_format_arguments_carry_the_scram_users_for_stdin_only() -> None:
    lines = kafka_security.format_input(_settings(1, sasl=True), "cid", Path("/p")).splitlines()

    assert lines[:5] == ["format", "-t", "cid", "-c", "/p"]
    assert "SCRAM-SHA-512=[name=client,password=pw-client]" in lines
    assert kafka_security.format_input(_settings(1, sasl=False), "cid", Path("/p")).splitlines()[5:] == []


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage tool reads "-…" as an option; a UUID whose first six bits are 111110 encodes to "-"."""
    drawn = iter([uuid.UUID(bytes=b"\xf8" + b"\x01" * 15), uuid.UUID(bytes=b"\x10" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))
    cluster = kafka_security.cluster_id()
    assert not cluster.startswith("-")
    assert cluster == "EBAQEBAQEBAQEBAQEBAQEA"
