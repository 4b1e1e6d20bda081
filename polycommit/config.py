"""Where every server is and how to reach it: one place that the CLI, the scripts and the tests all read.

Each address has a default on 127.0.0.1 and one environment variable that overrides it, so nothing else
in the project hard-codes a port. Secrets come only from the environment; when a variable is unset, the
value that `scripts/setup` generated into `<home>/secrets.env` (mode 0600) is used instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parent.parent


def _home() -> Path:
    return Path(os.environ.get("POLYCOMMIT_HOME", str(REPO_ROOT / ".polycommit"))).resolve()


def _secrets_file(home: Path) -> dict[str, str]:
    """Read KEY=VALUE lines written by scripts/setup; the environment always wins over this file."""
    path = home / "secrets.env"
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def _env(name: str, default: str, secrets: dict[str, str] | None = None) -> str:
    if name in os.environ:
        return os.environ[name]
    if secrets is not None and name in secrets:
        return secrets[name]
    return default


@dataclass(frozen=True)
class PostgresSettings:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str

    @property
    def dsn(self) -> str:
        return f"postgresql://{quote(self.user)}:{quote(self.password)}@{self.host}:{self.port}/{quote(self.database)}"

    @property
    def public_dsn(self) -> str:
        """The DSN without its password: safe to print."""
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{quote(self.database)}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


SECURITY_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
# The Kafka principals polycommit's parts run as, each with its own ACLs (polycommit/acls.py).
KAFKA_ROLES = ("admin", "client", "coordinator", "consumer", "detector")
# ... and the brokers' own principal (inter-broker and controller traffic), a super user.
KAFKA_PRINCIPALS = ("broker", *KAFKA_ROLES)


@dataclass(frozen=True)
class KafkaCredentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class KafkaSettings:
    """Where the brokers are and how a client proves who it is (SASL) and checks who they are (TLS)."""

    bootstrap: str  # every broker, comma-separated
    controller_port: int
    brokers: int = 1  # the size of the local cluster `scripts/services start` runs
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    credentials: KafkaCredentials | None = None  # who this process is; None without SASL
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Every role's credentials known here (role -> credentials): a process picks its own with `as_role`,
    # `scripts/services` creates them all on the broker.
    roles: dict[str, KafkaCredentials] = field(default_factory=dict, repr=False, compare=False)

    @property
    def address(self) -> str:
        return self.bootstrap

    @property
    def first_broker(self) -> str:
        return self.bootstrap.split(",", 1)[0].strip()

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def as_role(self, role: str) -> KafkaSettings:
        """The same cluster, as the principal of `role` when its credentials are known (else unchanged:
        a PLAINTEXT cluster, or one where every part shares the default principal)."""
        if role not in self.roles:
            return self
        return replace(self, credentials=self.roles[role])


@dataclass(frozen=True)
class Neo4jSettings:
    uri: str
    user: str
    password: str = field(repr=False)

    @property
    def address(self) -> str:
        return self.uri.split("://", 1)[-1]


@dataclass(frozen=True)
class QdrantSettings:
    """`url` set means a Qdrant server through qdrant-client; otherwise the embedded Qdrant Edge engine."""

    url: str | None
    api_key: str | None = field(repr=False)
    edge_path: Path
    local_path: Path | None
    fsync: bool = False  # flush the Edge shards after every batch (POLYCOMMIT_QDRANT_FSYNC=1)

    @property
    def backend(self) -> str:
        if self.url:
            return "client"
        if self.local_path is not None:
            return "local"
        return "edge"

    @property
    def address(self) -> str:
        if self.url:
            return self.url
        if self.local_path is not None:
            return f"local:{self.local_path}"
        return f"edge:{self.edge_path}"


@dataclass(frozen=True)
class Settings:
    home: Path
    postgres: PostgresSettings
    kafka: KafkaSettings
    neo4j: Neo4jSettings
    qdrant: QdrantSettings
    topic_prefix: str
    max_payload_bytes: int
    # Each coordinator process needs its own Kafka transactional id; a restarted process that keeps its
    # instance name fences the predecessor it replaces (a zombie can no longer commit).
    coordinator_instance: str = "0"
    # How coordinator members share the work (orchestrator/members.py): `active-standby`, one member
    # coordinates everything and the others take over when it goes (safe: one lock table sees every
    # transaction), or `partitioned`, the transaction partitions split among members (README: Scaling).
    coordinator_members: str = "active-standby"
    # Set, it makes each store consumer a static group member named `<store>-<instance>` (back in under
    # a second after a crash, instead of after the session timeout); two live consumers of one store must
    # then have different names. Unset (the default), members are dynamic and need no names.
    consumer_instance: str | None = None
    # How long applied-step markers are kept after a transaction ends (`polycommit prune`); the
    # coordinator refuses an intent created longer ago than this (POLYCOMMIT_MARKER_RETENTION, e.g. 7d).
    marker_retention_ms: int = 7 * 24 * 3600 * 1000
    # Where locks are kept (POLYCOMMIT_LOCK_MANAGER): `member`, each coordinator member's own table (every
    # protocol), or `partitioned`, the lock manager partitioned by resource key (`polycommit run
    # lock-manager`; sagas only, orchestrator/partitioned_locking.py). Change it with nothing in flight.
    lock_manager: str = "member"

    def as_role(self, role: str) -> Settings:
        """These settings with Kafka credentials of `role` (`coordinator`, `consumer`, ...), if known."""
        return replace(self, kafka=self.kafka.as_role(role))

    @property
    def cache_dir(self) -> Path:
        return Path(os.environ.get("POLYCOMMIT_CACHE", str(REPO_ROOT / ".cache"))).resolve()

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


def _local_brokers(home: Path) -> int:
    """The cluster size: POLYCOMMIT_KAFKA_BROKERS, else what `scripts/services start` recorded, else 1."""
    if "POLYCOMMIT_KAFKA_BROKERS" in os.environ:
        return int(os.environ["POLYCOMMIT_KAFKA_BROKERS"])
    try:
        return int((home / "run" / "kafka.brokers").read_text().strip())
    except (OSError, ValueError):
        return 1


def _role_credentials(secrets: dict[str, str]) -> dict[str, KafkaCredentials]:
    """POLYCOMMIT_KAFKA_PASSWORD_<ROLE> (+ optional POLYCOMMIT_KAFKA_USERNAME_<ROLE>, default the role)."""
    roles = {}
    for role in KAFKA_PRINCIPALS:
        password = _env(f"POLYCOMMIT_KAFKA_PASSWORD_{role.upper()}", "", secrets)
        if password:
            username = _env(f"POLYCOMMIT_KAFKA_USERNAME_{role.upper()}", role, secrets)
            roles[role] = KafkaCredentials(username, password)
    return roles


def broker_ports(port: int, controller_port: int, brokers: int) -> tuple[list[int], list[int]]:
    """Ports of a local cluster: brokers on consecutive ports from `port`; controllers (one per node)
    from `controller_port`, or right after the brokers when that would overlap them."""
    listen = [port + i for i in range(brokers)]
    controllers = [controller_port + i for i in range(brokers)]
    if set(controllers) & set(listen):
        controllers = [port + brokers + i for i in range(brokers)]
    return listen, controllers


def _kafka_settings(home: Path, secrets: dict[str, str]) -> KafkaSettings:
    brokers = _local_brokers(home)
    controller_port = int(_env("POLYCOMMIT_KAFKA_CONTROLLER_PORT", "59093"))
    bootstrap = _env("POLYCOMMIT_KAFKA_BOOTSTRAP", "", secrets)
    if not bootstrap or (brokers > 1 and "," not in bootstrap):
        port = int(bootstrap.rsplit(":", 1)[1]) if bootstrap else 59092
        bootstrap = ",".join(f"127.0.0.1:{p}" for p in broker_ports(port, controller_port, brokers)[0])
    roles = _role_credentials(secrets)
    # The tools' default principal is the admin one; a process picks its role's with Settings.as_role.
    password = _env("POLYCOMMIT_KAFKA_PASSWORD", "", secrets)
    username = _env("POLYCOMMIT_KAFKA_USERNAME", "", secrets)
    if password:
        default: KafkaCredentials | None = KafkaCredentials(username or "admin", password)
    else:
        default = roles.get("admin")
        if username and default is not None:
            default = KafkaCredentials(username, default.password)
    # With credentials the default is SASL (what `scripts/services start` runs); without, PLAINTEXT.
    protocol = _env("POLYCOMMIT_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT" if default else "PLAINTEXT", secrets)
    protocol = protocol.strip().upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"POLYCOMMIT_KAFKA_SECURITY_PROTOCOL={protocol!r}: one of {', '.join(SECURITY_PROTOCOLS)}")
    return KafkaSettings(
        bootstrap=bootstrap,
        controller_port=controller_port,
        brokers=brokers,
        security_protocol=protocol,
        sasl_mechanism=_env("POLYCOMMIT_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512", secrets),
        credentials=default,
        ssl_cafile=_env("POLYCOMMIT_KAFKA_SSL_CAFILE", "", secrets) or None,
        ssl_certfile=_env("POLYCOMMIT_KAFKA_SSL_CERTFILE", "", secrets) or None,
        ssl_keyfile=_env("POLYCOMMIT_KAFKA_SSL_KEYFILE", "", secrets) or None,
        roles=roles,
    )


def load_settings() -> Settings:
    """Build the settings from the environment (read at call time, so tests may override variables)."""
    home = _home()
    secrets = _secrets_file(home)
    local = os.environ.get("POLYCOMMIT_QDRANT_LOCAL_PATH")
    return Settings(
        home=home,
        postgres=PostgresSettings(
            host=_env("POLYCOMMIT_PG_HOST", "127.0.0.1"),
            port=int(_env("POLYCOMMIT_PG_PORT", "55432")),
            user=_env("POLYCOMMIT_PG_USER", "polycommit"),
            password=_env("POLYCOMMIT_PG_PASSWORD", "", secrets),
            database=_env("POLYCOMMIT_PG_DATABASE", "polycommit"),
        ),
        kafka=_kafka_settings(home, secrets),
        neo4j=Neo4jSettings(
            uri=_env("POLYCOMMIT_NEO4J_URI", "bolt://127.0.0.1:57687"),
            user=_env("POLYCOMMIT_NEO4J_USER", "neo4j"),
            password=_env("POLYCOMMIT_NEO4J_PASSWORD", "", secrets),
        ),
        qdrant=QdrantSettings(
            url=os.environ.get("QDRANT_URL") or None,
            api_key=os.environ.get("QDRANT_API_KEY") or None,
            edge_path=Path(_env("POLYCOMMIT_QDRANT_EDGE_PATH", str(home / "data" / "qdrant-edge"))),
            local_path=Path(local) if local else None,
            fsync=_env("POLYCOMMIT_QDRANT_FSYNC", "0") not in ("", "0", "false", "no"),
        ),
        topic_prefix=_env("POLYCOMMIT_TOPIC_PREFIX", "polycommit"),
        max_payload_bytes=int(_env("POLYCOMMIT_MAX_PAYLOAD_BYTES", str(1024 * 1024))),
        coordinator_instance=_env("POLYCOMMIT_COORDINATOR_INSTANCE", "0"),
        coordinator_members=_env("POLYCOMMIT_COORDINATOR_MEMBERS", "active-standby"),
        consumer_instance=os.environ.get("POLYCOMMIT_CONSUMER_INSTANCE") or None,
        marker_retention_ms=parse_duration_ms(_env("POLYCOMMIT_MARKER_RETENTION", "7d")),
        lock_manager=_lock_manager(_env("POLYCOMMIT_LOCK_MANAGER", "member")),
    )


LOCK_MANAGERS = ("member", "partitioned")


def _lock_manager(value: str) -> str:
    value = value.strip().lower()
    if value not in LOCK_MANAGERS:
        raise ValueError(f"POLYCOMMIT_LOCK_MANAGER={value!r}: one of {', '.join(LOCK_MANAGERS)}")
    return value


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """`7d`, `12h`, `30m`, `45s`, `500ms` (a bare number is seconds) as milliseconds."""
    value = text.strip().lower()
    for unit in sorted(_UNITS_MS, key=len, reverse=True):
        if value.endswith(unit) and value[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(value[: -len(unit)]) * _UNITS_MS[unit])
    if value.replace(".", "", 1).isdigit():
        return int(float(value) * 1000)
    raise ValueError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m, 45s or 500ms)")
