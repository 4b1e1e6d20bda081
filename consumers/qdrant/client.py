"""qdrant-client behind `QdrantBackend`: a Qdrant server, or local mode for tests and small demos."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from consumers.qdrant.backend import PointData, check_distance, check_name, engine_id, point_data
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.parsed import IDENTIFIER

T = TypeVar("T")

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
        check_name(name)
        check_distance(distance)
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
        return point_data(records, with_vectors)

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
