"""Where every server is and how to reach it: one place that the CLI, the scripts and the tests all read.

Each address has a default on 127.0.0.1 and one environment variable that overrides it, so nothing else
in the project hard-codes a port. Secrets come only from the environment; when a variable is unset, the
value that `scripts/setup` generated into `<home>/secrets.env` (mode 0600) is used instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str
    controller_port: int

    @property
    def address(self) -> str:
        return self.bootstrap


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
    # Set, it makes each store consumer a static group member named `<store>-<instance>` (back in under
    # a second after a crash, instead of after the session timeout); two live consumers of one store must
    # then have different names. Unset (the default), members are dynamic and need no names.
    consumer_instance: str | None = None
    # How long applied-step markers are kept after a transaction ends (`polycommit prune`); the
    # coordinator refuses an intent created longer ago than this (POLYCOMMIT_MARKER_RETENTION, e.g. 7d).
    marker_retention_ms: int = 7 * 24 * 3600 * 1000

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
        kafka=KafkaSettings(
            bootstrap=_env("POLYCOMMIT_KAFKA_BOOTSTRAP", "127.0.0.1:59092"),
            controller_port=int(_env("POLYCOMMIT_KAFKA_CONTROLLER_PORT", "59093")),
        ),
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
        consumer_instance=os.environ.get("POLYCOMMIT_CONSUMER_INSTANCE") or None,
        marker_retention_ms=parse_duration_ms(_env("POLYCOMMIT_MARKER_RETENTION", "7d")),
    )


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
