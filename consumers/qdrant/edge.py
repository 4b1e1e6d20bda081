"""Qdrant Edge behind `QdrantBackend`: one embedded shard (a directory with its own WAL) per collection."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from consumers.qdrant.backend import PointData, check_distance, check_name, engine_id, point_data
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.parsed import IDENTIFIER

T = TypeVar("T")

# -- Qdrant Edge ------------------------------------------------------------------------------------

# Edge calls are synchronous and fast (about 10 µs per point upserted, 2 µs per point read, measured on
# 2 cores), so small calls run on the event loop: a thread hop costs more than the call. Only calls big
# enough to hold the loop for several milliseconds go to a worker thread.
THREAD_THRESHOLD_POINTS = 1000

# Edge raises plain `Exception`s; these fragments of their messages mean the shard cannot be used right
# now (another process holds its WAL lock, the shard is closed, the disk failed) rather than a bad input.
_UNAVAILABLE_MARKERS = ("WAL", "WouldBlock", "not initialized", "os error", "I/O", "Permission denied")


class EdgeBackend:
    """Qdrant Edge: one embedded shard (a directory with its own WAL) per collection under `root`.

    Shards stay open for the life of the backend: opening takes the WAL lock, and a second opener of the
    same directory (another process, or another backend in this one) is refused until `close()`.
    """

    name = "edge"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.address = f"edge:{self.root}"
        self._shards: dict[str, Any] = {}  # collection -> qdrant_edge.EdgeShard
        self._sizes: dict[str, int] = {}

    # -- plumbing -----------------------------------------------------------------------------------

    def _path(self, collection: str) -> Path:
        check_name(collection)
        return self.root / collection

    def _classify(self, exc: Exception, collection: str) -> StoreError | StoreUnavailableError:
        message = f"Qdrant Edge shard {self._path(collection)}: {exc}"
        if "WAL" in str(exc) and "WouldBlock" in str(exc):
            return StoreUnavailableError(
                f"Qdrant Edge storage {self._path(collection)} is open in another process or backend "
                f"(its WAL is locked); only one opener per path is allowed: {exc}"
            )
        if any(fragment in str(exc) for fragment in _UNAVAILABLE_MARKERS):
            return StoreUnavailableError(message)
        return StoreError(message, retriable=False, store="qdrant")

    async def _call(self, collection: str, weight: int, fn: Callable[..., T], *args: Any) -> T:
        try:
            if weight >= THREAD_THRESHOLD_POINTS:
                return await asyncio.to_thread(fn, *args)
            return fn(*args)
        except (StoreError, StoreUnavailableError, InvalidOperationError):
            raise
        except Exception as exc:
            raise self._classify(exc, collection) from exc

    def _config_size(self, collection: str) -> int | None:
        """The vector size recorded in the shard's `edge_config.json` (written by Edge on create)."""
        config = self._path(collection) / "edge_config.json"
        if not config.is_file():
            return None
        vectors = json.loads(config.read_text()).get("vectors", {})
        default = vectors.get("") if isinstance(vectors, dict) else None
        return int(default["size"]) if isinstance(default, dict) and "size" in default else None

    async def _shard(self, collection: str) -> Any | None:
        """The open shard of a collection, opening it on first use; None when it does not exist."""
        shard = self._shards.get(collection)
        if shard is not None:
            return shard
        size = self._config_size(collection)
        if size is None:
            return None
        from qdrant_edge import EdgeShard

        shard = await self._call(collection, 0, EdgeShard.load, str(self._path(collection)))
        self._shards[collection], self._sizes[collection] = shard, size
        return shard

    async def _open(self, collection: str) -> Any:
        shard = await self._shard(collection)
        if shard is None:
            raise StoreError(
                f"Qdrant Edge collection {collection} does not exist under {self.root}", retriable=False, store="qdrant"
            )
        return shard

    # -- the interface ------------------------------------------------------------------------------

    async def ensure_collection(self, name: str, size: int, distance: str) -> int:
        check_distance(distance)
        if await self._shard(name) is None:
            from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams

            config = EdgeConfig(vectors=EdgeVectorParams(size=size, distance=getattr(Distance, distance)))
            self._path(name).mkdir(parents=True, exist_ok=True)
            self._shards[name] = await self._call(name, 0, EdgeShard.create, str(self._path(name)), config)
            self._sizes[name] = size
        return self._sizes[name]

    async def collection_info(self, name: str) -> int | None:
        if not IDENTIFIER.match(name):
            return None
        return self._sizes[name] if await self._shard(name) is not None else None

    async def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = True) -> dict[str, PointData]:
        if not ids:
            return {}
        shard = await self._open(collection)
        records = await self._call(
            collection, len(ids), shard.retrieve, [engine_id(i) for i in ids], True, with_vectors
        )
        return point_data(records, with_vectors)

    async def upsert(self, collection: str, points: Mapping[str, PointData]) -> None:
        if not points:
            return
        from qdrant_edge import Point, UpdateOperation

        shard = await self._open(collection)
        batch = [Point(engine_id(i), p["vector"], p["payload"]) for i, p in points.items()]
        await self._call(collection, len(batch), shard.update, UpdateOperation.upsert_points(batch))

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        from qdrant_edge import UpdateOperation

        shard = await self._open(collection)
        operation = UpdateOperation.delete_points([engine_id(i) for i in ids])
        await self._call(collection, len(ids), shard.update, operation)

    async def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        if not ids:
            return
        from qdrant_edge import UpdateOperation

        shard = await self._open(collection)
        operation = UpdateOperation.set_payload([engine_id(i) for i in ids], dict(payload))
        await self._call(collection, len(ids), shard.update, operation)

    async def flush(self) -> None:
        for collection, shard in list(self._shards.items()):
            await self._call(collection, THREAD_THRESHOLD_POINTS, shard.flush)

    async def close(self) -> None:
        """Flush and close every shard, releasing their WAL locks (the next call reopens them)."""
        shards, self._shards, self._sizes = self._shards, {}, {}
        for collection, shard in shards.items():
            await self._call(collection, 0, shard.flush)
            await self._call(collection, 0, shard.close)

    async def version(self) -> str:
        return f"qdrant-edge-py {importlib.metadata.version('qdrant-edge-py')}"
