"""How every Kafka client polycommit creates connects: bootstrap list, SASL and TLS, from the settings.

One place, so that the producer, the consumers, the admin client and the probes all authenticate the
same way (POLYCOMMIT_KAFKA_SECURITY_PROTOCOL, POLYCOMMIT_KAFKA_SASL_MECHANISM, the credentials of the
process's role, POLYCOMMIT_KAFKA_SSL_CAFILE ...). The password goes to aiokafka and nowhere else.
"""

from __future__ import annotations

from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from polycommit.config import Settings


def client_security(settings: Settings) -> dict[str, Any]:
    """The connection settings every aiokafka client polycommit creates gets: the bootstrap list, and
    the SASL and TLS settings of `settings.kafka` (POLYCOMMIT_KAFKA_SECURITY_PROTOCOL and friends)."""
    kafka = settings.kafka
    options: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap, "security_protocol": kafka.security_protocol}
    if kafka.sasl:
        if kafka.credentials is None:
            raise ValueError(
                f"POLYCOMMIT_KAFKA_SECURITY_PROTOCOL={kafka.security_protocol} needs POLYCOMMIT_KAFKA_PASSWORD "
                "(or the secrets scripts/setup generates)"
            )
        options |= {
            "sasl_mechanism": kafka.sasl_mechanism,
            "sasl_plain_username": kafka.credentials.username,
            "sasl_plain_password": kafka.credentials.password,
        }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(
            cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile
        )
    return options


def make_admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    """An admin client with this process's connection settings (`client_security`)."""
    return AIOKafkaAdminClient(**client_security(settings), **options)
