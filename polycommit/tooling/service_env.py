"""`polycommit services env`: the connection settings as shell exports, for psql, cypher-shell and the CLI.

`eval "$(polycommit services env --show-secrets)"` gives a shell polycommit's own variables and the ones
the servers' stock clients read (PGHOST... for psql, NEO4J_ADDRESS... for cypher-shell). Passwords are
printed only with --show-secrets; otherwise a comment says how to get them.
"""

from __future__ import annotations

import shlex

from polycommit.config import Settings

_PASSWORDS = ("POLYCOMMIT_PG_PASSWORD", "PGPASSWORD", "POLYCOMMIT_NEO4J_PASSWORD", "NEO4J_PASSWORD")


def exports(settings: Settings) -> dict[str, str]:
    """Every variable, secrets included (the caller decides whether to show them)."""
    pg, neo4j, qdrant = settings.postgres, settings.neo4j, settings.qdrant
    values = {
        "POLYCOMMIT_HOME": str(settings.home),
        "POLYCOMMIT_TOPIC_PREFIX": settings.topic_prefix,
        "POLYCOMMIT_PG_HOST": pg.host,
        "POLYCOMMIT_PG_PORT": str(pg.port),
        "POLYCOMMIT_PG_USER": pg.user,
        "POLYCOMMIT_PG_DATABASE": pg.database,
        "POLYCOMMIT_PG_PASSWORD": pg.password,
        "PGHOST": pg.host,
        "PGPORT": str(pg.port),
        "PGUSER": pg.user,
        "PGDATABASE": pg.database,
        "PGPASSWORD": pg.password,
        "POLYCOMMIT_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "POLYCOMMIT_KAFKA_CONTROLLER_PORT": str(settings.kafka.controller_port),
        "POLYCOMMIT_NEO4J_URI": neo4j.uri,
        "POLYCOMMIT_NEO4J_USER": neo4j.user,
        "POLYCOMMIT_NEO4J_PASSWORD": neo4j.password,
        "NEO4J_ADDRESS": neo4j.uri,
        "NEO4J_USERNAME": neo4j.user,
        "NEO4J_PASSWORD": neo4j.password,
    }
    if qdrant.url:
        values["QDRANT_URL"] = qdrant.url
    else:
        values["POLYCOMMIT_QDRANT_EDGE_PATH"] = str(qdrant.edge_path)
    return values


def render(settings: Settings, *, show_secrets: bool) -> str:
    lines = ['# polycommit connection settings: eval "$(polycommit services env)"']
    hidden = []
    for name, value in exports(settings).items():
        if name in _PASSWORDS and not show_secrets:
            hidden.append(name)
            continue
        lines.append(f"export {name}={shlex.quote(value)}")
    if hidden:
        lines.append(f"# {', '.join(hidden)} not shown: polycommit services env --show-secrets prints them")
    if settings.qdrant.api_key and show_secrets:
        lines.append(f"export QDRANT_API_KEY={shlex.quote(settings.qdrant.api_key)}")
    return "\n".join(lines)
