"""Formatting the local Kafka cluster's storage: its SCRAM users, and what it was formatted for.

SCRAM users exist from the first start: `kafka-storage format --add-scram` writes them into the metadata
log's bootstrap records (one per principal of polycommit/config.py's KAFKA_PRINCIPALS whose password
scripts/setup generated). The arguments, passwords included, reach the tool on stdin (StdinArgs.java),
never on a command line. A marker file beside the data records what the storage was formatted for (the
node count, and a digest of the credentials): storage formatted for something else (a single PLAINTEXT
broker of an older polycommit, new passwords, another cluster size) is moved aside, never deleted, and
formatted afresh, since SCRAM users can only be added at format time without a running, reachable admin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path

from polycommit.config import Settings
from polycommit.tooling.servers.kafka_config import SCRAM, Node
from polycommit.tooling.servers.process import MissingSecretError

STDIN_ARGS = Path(__file__).with_name("StdinArgs.java")
STORAGE_TOOL = "kafka.tools.StorageTool"
MARKER = "polycommit-format.json"


def broker_password(settings: Settings) -> str | None:
    """The brokers' own password when the cluster runs SASL; None for PLAINTEXT."""
    kafka = settings.kafka
    if kafka.security_protocol == "PLAINTEXT":
        return None
    if kafka.security_protocol != "SASL_PLAINTEXT" or kafka.sasl_mechanism != SCRAM:
        raise MissingSecretError(
            f"the local Kafka runs PLAINTEXT or SASL_PLAINTEXT with {SCRAM}, not "
            f"{kafka.security_protocol}/{kafka.sasl_mechanism}: unset POLYCOMMIT_KAFKA_SECURITY_PROTOCOL"
        )
    missing = [role for role in ("broker", "admin") if role not in kafka.roles]
    if missing:
        names = ", ".join(f"POLYCOMMIT_KAFKA_PASSWORD_{role.upper()}" for role in missing)
        raise MissingSecretError(f"kafka: no {names} in {settings.home / 'secrets.env'}; run scripts/setup")
    return kafka.roles["broker"].password


def scram_arguments(settings: Settings) -> list[str]:
    """`--add-scram` arguments, one per known principal (broker and admin at least)."""
    args = []
    for credentials in settings.kafka.roles.values():
        args += ["--add-scram", f"{SCRAM}=[name={credentials.username},password={credentials.password}]"]
    return args


def format_digest(settings: Settings, nodes: list[Node]) -> dict[str, object]:
    """What a storage is formatted for; the credentials only as a salted digest (the marker is no secret)."""
    if broker_password(settings) is None:
        security = "plaintext"
    else:
        users = sorted((c.username, c.password) for c in settings.kafka.roles.values())
        security = "scram:" + hashlib.sha256(json.dumps(users).encode() + b"polycommit-kafka").hexdigest()
    return {"brokers": len(nodes), "security": security}


def read_marker(data: Path) -> dict[str, object] | None:
    """The marker of a formatted storage (None: not formatted); storage formatted before markers existed
    was a single PLAINTEXT node."""
    if not (data / "kraft" / "meta.properties").exists():
        return None
    try:
        found: dict[str, object] = json.loads((data / MARKER).read_text())
        return found
    except (OSError, ValueError):
        return {"brokers": 1, "security": "plaintext"}


def compatible(found: dict[str, object], wanted: dict[str, object]) -> bool:
    """A PLAINTEXT start may reuse SCRAM-formatted storage (the users just go unused), not the reverse."""
    if found.get("brokers") != wanted["brokers"]:
        return False
    return wanted["security"] == "plaintext" or found.get("security") == wanted["security"]


def move_aside(data: Path, reason: str) -> Path:
    """Keep an incompatible storage under a dated name; a fresh one is formatted in its place."""
    target = data.with_name(f"{data.name}.{reason}-{time.strftime('%Y%m%dT%H%M%S')}")
    data.rename(target)
    return target


def cluster_id() -> str:
    """A KRaft cluster id. One starting with "-" is drawn again, as Kafka's own Uuid.randomUuid does: the
    storage tool's argument parser reads it as an option and fails ("--cluster-id expected one argument")."""
    while True:
        drawn = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not drawn.startswith("-"):
            return drawn


def format_input(settings: Settings, cluster: str, properties: Path) -> str:
    """StorageTool's arguments, one per line, for StdinArgs.java."""
    args = ["format", "-t", cluster, "-c", str(properties), *scram_arguments(settings)]
    if broker_password(settings) is None:
        args = args[:5]
    return "\n".join(args) + "\n"


def write_marker(data: Path, digest: dict[str, object]) -> None:
    (data / MARKER).write_text(json.dumps(digest) + "\n")
