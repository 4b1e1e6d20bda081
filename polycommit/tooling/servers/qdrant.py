"""Qdrant's status: it runs embedded (Qdrant Edge, or a local qdrant-client folder) or at a URL, never here.

There is nothing to start or stop; the status says whether the library is installed and its folder
writable, or, with a URL, whether the server answers.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import os
from pathlib import Path

from polycommit.config import Settings
from polycommit.tooling.servers.process import PROBE_TIMEOUT_S, ServerStatus


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


async def status(settings: Settings) -> ServerStatus:
    q = settings.qdrant
    extra = {"backend": q.backend}
    if q.url:
        from qdrant_client import AsyncQdrantClient

        extra["url"] = q.url
        client = AsyncQdrantClient(url=q.url, api_key=q.api_key, timeout=int(PROBE_TIMEOUT_S))
        try:
            await asyncio.wait_for(client.get_collections(), PROBE_TIMEOUT_S)
            info = await asyncio.wait_for(client.info(), PROBE_TIMEOUT_S)
            return ServerStatus("qdrant", q.address, info.version, True, None, extra)
        except (Exception, TimeoutError) as exc:
            extra["error"] = f"{type(exc).__name__}: {exc}"
            return ServerStatus("qdrant", q.address, None, False, None, extra)
        finally:
            await client.close()
    module, package = ("qdrant_edge", "qdrant-edge-py")
    path = q.edge_path
    if q.local_path is not None:
        module, package, path = ("qdrant_client", "qdrant-client", q.local_path)
    extra["path"] = str(path)
    try:
        version: str | None = importlib.metadata.version(package)
        importlib.import_module(module)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        extra["error"] = f"{package} is not installed: {exc}"
        return ServerStatus("qdrant", q.address, None, False, None, extra)
    writable = os.access(_nearest_existing(path), os.W_OK)
    if not writable:
        extra["error"] = f"{_nearest_existing(path)} is not writable"
    return ServerStatus("qdrant", q.address, version, writable, None, extra)
