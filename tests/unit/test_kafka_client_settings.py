"""Kafka client settings from the environment and secrets.env: protocol, credentials per role, bootstrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polycommit.config import broker_ports, load_settings
from polycommit.kafka_client import client_security

KAFKA_VARIABLES = [name for name in os.environ if name.startswith("POLYCOMMIT_KAFKA_") or name == "POLYCOMMIT_HOME"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in KAFKA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POLYCOMMIT_HOME", str(tmp_path))
    return tmp_path


def _secrets(home: Path, **values: str) -> None:
    (home / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def test_without_credentials_clients_use_plaintext_as_before(home: Path) -> None:
    settings = load_settings()

    assert settings.kafka.security_protocol == "PLAINTEXT"
    assert client_security(settings) == {"bootstrap_servers": "127.0.0.1:59092", "security_protocol": "PLAINTEXT"}


def test_generated_secrets_make_the_admin_principal_the_default_over_sasl_scram(home: Path) -> None:
    _secrets(home, POLYCOMMIT_KAFKA_PASSWORD_ADMIN="a" * 8, POLYCOMMIT_KAFKA_PASSWORD_CLIENT="c" * 8)

    options = client_security(load_settings())

    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("admin", "a" * 8)


def test_a_process_picks_its_roles_principal_and_the_password_is_never_in_a_repr(home: Path) -> None:
    _secrets(home, POLYCOMMIT_KAFKA_PASSWORD_ADMIN="secret-admin", POLYCOMMIT_KAFKA_PASSWORD_COORDINATOR="secret-co")
    settings = load_settings()

    coordinator = settings.as_role("coordinator")
    unknown = settings.as_role("detector")  # no credentials for it: unchanged

    assert client_security(coordinator)["sasl_plain_username"] == "coordinator"
    assert client_security(coordinator)["sasl_plain_password"] == "secret-co"
    assert unknown.kafka.credentials == settings.kafka.credentials
    for text in (repr(settings), repr(coordinator), repr(coordinator.kafka)):
        assert "secret-" not in text


def test_the_environment_wins_over_secrets_and_can_switch_protocol_off(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _secrets(home, POLYCOMMIT_KAFKA_PASSWORD_ADMIN="from-file")
    monkeypatch.setenv("POLYCOMMIT_KAFKA_SECURITY_PROTOCOL", "plaintext")
    assert client_security(load_settings())["security_protocol"] == "PLAINTEXT"

    monkeypatch.setenv("POLYCOMMIT_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("POLYCOMMIT_KAFKA_USERNAME", "ops")
    monkeypatch.setenv("POLYCOMMIT_KAFKA_PASSWORD", "from-env")
    options = client_security(load_settings())
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("ops", "from-env")


def test_sasl_without_a_password_and_an_unknown_protocol_are_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLYCOMMIT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValueError, match="POLYCOMMIT_KAFKA_PASSWORD"):
        client_security(load_settings())
    monkeypatch.setenv("POLYCOMMIT_KAFKA_SECURITY_PROTOCOL", "KERBEROS")
    with pytest.raises(ValueError, match="one of"):
        load_settings()


def test_a_three_broker_cluster_is_bootstrapped_from_every_broker(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYCOMMIT_KAFKA_BROKERS", "3")
    assert load_settings().kafka.bootstrap == "127.0.0.1:59092,127.0.0.1:59093,127.0.0.1:59094"

    monkeypatch.delenv("POLYCOMMIT_KAFKA_BROKERS")
    (home / "run").mkdir()
    (home / "run" / "kafka.brokers").write_text("3\n")  # what `scripts/services start --kafka-brokers 3` records
    assert load_settings().kafka.brokers == 3


def test_controller_ports_never_overlap_broker_ports() -> None:
    assert broker_ports(59092, 59093, 1) == ([59092], [59093])
    brokers, controllers = broker_ports(59092, 59093, 3)
    assert brokers == [59092, 59093, 59094]
    assert controllers == [59095, 59096, 59097]
    assert broker_ports(40000, 50000, 3) == ([40000, 40001, 40002], [50000, 50001, 50002])
