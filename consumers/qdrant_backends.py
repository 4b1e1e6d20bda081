"""Two ways to reach Qdrant behind one small interface: the embedded Qdrant Edge engine, and qdrant-client.

The participant (`consumers/qdrant.py`) speaks only `QdrantBackend`: collections by name, points by
string id (an unsigned integer as text, or a UUID), each point a dense default vector plus a JSON
payload. A backend converts ids to what its engine takes and turns engine failures into polycommit's
typed errors: `StoreUnavailableError` when trying again later may help (a lock held by another
process, a server that cannot be reached), `StoreError` otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict, TypeVar

from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.operations import IDENTIFIER

T = TypeVar("T")

DISTANCES = ("Cosine", "Euclid", "Dot", "Manhattan")

# Qdrant point ids are unsigned 64-bit integers or UUIDs.
_MAX_INT_ID = 2**64 - 1


class PointData(TypedDict):
    vector: list[float]
    payload: dict[str, Any]


class QdrantBackend(Protocol):
    """What the participant needs from Qdrant; every call is one round trip (or one engine call)."""

    name: str  # "edge" | "client" | "local"
    address: str

    async def ensure_collection(self, name: str, size: int, distance: str) -> int:
        """Create the collection if it is missing; return its vector size (which may differ from `size`)."""
        ...

    async def collection_info(self, name: str) -> int | None:
        """The collection's vector size, or None when it does not exist."""
        ...

    async def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = True) -> dict[str, PointData]:
        """The points that exist among `ids`, by canonical id; missing ids are absent from the result."""
        ...

    async def upsert(self, collection: str, points: Mapping[str, PointData]) -> None: ...

    async def delete(self, collection: str, ids: Sequence[str]) -> None: ...

    async def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Merge `payload` into the payload of existing points (all of `ids` must exist)."""
        ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    async def version(self) -> str:
        """The engine's version; a live call where the engine is remote."""
        ...


# -- point ids --------------------------------------------------------------------------------------


def canonical_id(value: object) -> str:
    """The one text form of a point id: decimal digits for integers, lower-case hyphenated UUIDs.

    Equal ids must give equal strings: they key before-images, lock keys and write merging.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isdigit():
        number = int(value)
    else:
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise InvalidOperationError(f"point id {value!r} is neither an unsigned integer nor a UUID") from None
    if number > _MAX_INT_ID:
        raise InvalidOperationError(f"point id {value!r} does not fit an unsigned 64-bit integer")
    return str(number)


def engine_id(point_id: str) -> int | str:
    """An id in the form both engines take: an int, or the UUID text (numeric text is refused by Edge)."""
    return int(point_id) if point_id.isdigit() else point_id


def dense_vector(vector: object) -> list[float]:
    """The default (unnamed) dense vector of a stored point, whichever shape the engine returns it in."""
    if isinstance(vector, dict):
        vector = vector.get("")
    if not isinstance(vector, list):
        raise StoreError(
            f"expected a dense default vector, got {type(vector).__name__}", retriable=False, store="qdrant"
        )
    return [float(x) for x in vector]


def _check_name(name: str) -> None:
    # Edge maps a collection to a directory: a plain identifier can never escape the storage root.
    if not IDENTIFIER.match(name):
        raise InvalidOperationError(f"collection name {name!r} is not a plain identifier")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise InvalidOperationError(f"unknown distance {distance!r}; Qdrant has {', '.join(DISTANCES)}")


# -- Qdrant Edge ------------------------------------------------------------------------------------

# Edge calls are synchronous and fast (about 10 µs per point upserted, 2 µs per point read, measured on
# 2 cores), so small calls run on the event loop: a thread hop costs more than the call. Only calls big
# enough to hold the loop for several milliseconds go to a worker thread.
THREAD_THRESHOLD_POINTS = 1000

# Edge raises plain `Exception`s; these fragments of their messages mean the shard cannot be used right
# now (another process holds its WAL lock, the shard is closed, the disk failed) rather than a bad input.
_UNAVAILABLE_MARKERS = ("WAL", "WouldBlock", "not initialized", "os error", "I/O", "Permission denied")


def _point_data(records: Iterable[Any], with_vectors: bool) -> dict[str, PointData]:
    """Retrieved records (Edge's or qdrant-client's: both have id, vector, payload) by canonical id."""
    return {
        canonical_id(r.id): {
            "vector": dense_vector(r.vector) if with_vectors else [],
            "payload": dict(r.payload or {}),
        }
        for r in records
    }


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
        _check_name(collection)
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
        _check_distance(distance)
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
        return _point_data(records, with_vectors)

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


# -- qdrant-client ----------------------------------------------------------------------------------


class ClientBackend:
    """qdrant-client's `AsyncQdrantClient`: a Qdrant server (`url`, `api_key`) or local mode (`path`).

    Local mode is a stand-in for tests and small demos (one sqlite commit per point, ~900 points/s). The
    client is created on first use, so a backend can be closed and used again (the worker reconnects
    that way), and local mode's one-opener lock is taken only when the storage is really used.
    """

    def __init__(self, *, url: str | None = None, api_key: str | None = None, path: Path | str | None = None) -> None:
        if (url is None) == (path is None):
            raise ValueError("ClientBackend needs exactly one of url= (a server) or path= (local mode)")
        self.url, self.api_key = url, api_key
        self.path = Path(path) if path is not None else None
        self.name = "client" if url is not None else "local"
        self.address = url if url is not None else f"local:{self.path}"
        self._client: Any | None = None  # AsyncQdrantClient

    def _connect(self) -> Any:
        if self._client is None:
            from qdrant_client import AsyncQdrantClient

            try:
                if self.path is not None:
                    self._client = AsyncQdrantClient(path=str(self.path))
                else:
                    self._client = AsyncQdrantClient(url=self.url, api_key=self.api_key)
            except RuntimeError as exc:  # local mode: another client holds the storage folder's lock
                raise StoreUnavailableError(f"Qdrant local storage {self.path} is in use: {exc}") from exc
        return self._client

    async def _call(self, what: str, call: Callable[[Any], Awaitable[T]]) -> T:
        client = self._connect()
        try:
            return await call(client)
        except (StoreError, StoreUnavailableError, InvalidOperationError):
            raise
        except Exception as exc:
            raise self._classify(exc, what) from exc

    def _classify(self, exc: Exception, what: str) -> StoreError | StoreUnavailableError:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        message = f"Qdrant at {self.address}, {what}: {type(exc).__name__}: {exc}"
        if isinstance(exc, UnexpectedResponse):
            status = exc.status_code or 0
            if status in (408, 429) or status >= 500:
                return StoreUnavailableError(message)
            return StoreError(message, retriable=False, store="qdrant", code=str(status))
        if isinstance(exc, (ResponseHandlingException, OSError, TimeoutError)) or "closed" in str(exc):
            return StoreUnavailableError(message)
        return StoreError(message, retriable=False, store="qdrant")

    async def ensure_collection(self, name: str, size: int, distance: str) -> int:
        _check_name(name)
        _check_distance(distance)
        existing = await self.collection_info(name)
        if existing is not None:
            return existing
        from qdrant_client import models

        params = models.VectorParams(size=size, distance=models.Distance(distance))
        try:
            await self._call(f"create {name}", lambda c: c.create_collection(name, vectors_config=params))
        except StoreError:
            # Another consumer may have created it between our check and our create: that is success.
            if await self.collection_info(name) is None:
                raise
        return await self.collection_info(name) or size

    async def collection_info(self, name: str) -> int | None:
        if not IDENTIFIER.match(name):
            return None
        if not await self._call(f"exists {name}", lambda c: c.collection_exists(name)):
            return None
        info = await self._call(f"describe {name}", lambda c: c.get_collection(name))
        vectors = info.config.params.vectors
        if isinstance(vectors, dict):
            vectors = vectors.get("")
        return int(vectors.size) if vectors is not None else None

    async def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = True) -> dict[str, PointData]:
        if not ids:
            return {}
        keys = [engine_id(i) for i in ids]
        records = await self._call(
            f"retrieve from {collection}",
            lambda c: c.retrieve(collection, keys, with_payload=True, with_vectors=with_vectors),
        )
        return _point_data(records, with_vectors)

    async def upsert(self, collection: str, points: Mapping[str, PointData]) -> None:
        if not points:
            return
        from qdrant_client import models

        batch = [
            models.PointStruct(id=engine_id(i), vector=p["vector"], payload=p["payload"]) for i, p in points.items()
        ]
        # wait=True: the call returns once the points are applied, so a later read sees them.
        await self._call(f"upsert into {collection}", lambda c: c.upsert(collection, points=batch, wait=True))

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        from qdrant_client import models

        selector = models.PointIdsList(points=[engine_id(i) for i in ids])
        await self._call(
            f"delete from {collection}", lambda c: c.delete(collection, points_selector=selector, wait=True)
        )

    async def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        if not ids:
            return
        keys = [engine_id(i) for i in ids]
        await self._call(
            f"set payload in {collection}",
            lambda c: c.set_payload(collection, payload=dict(payload), points=keys, wait=True),
        )

    async def flush(self) -> None:
        """Nothing to do: a server persists through its own WAL, local mode commits on every write."""

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def version(self) -> str:
        package = f"qdrant-client {importlib.metadata.version('qdrant-client')}"
        if self.path is not None:
            # Local mode has no server; a cheap call still proves the storage opens and answers.
            await self._call("list collections", lambda c: c.get_collections())
            return f"{package} (local mode)"
        info = await self._call("version", lambda c: c.info())
        return str(info.version)
