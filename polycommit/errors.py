"""One error hierarchy for polycommit, split by whether trying again can help.

Callers catch by meaning: a `RetriableError` may succeed on a later attempt (a lock timeout, a deadlock, a
server restarting); a `PermanentError` never will (bad SQL, a wrong vector size, an unknown store), so the
step fails at once and a poison record goes to the dead-letter topic instead of blocking its partition.
"""

from __future__ import annotations


class PolycommitError(Exception):
    """Base of every error polycommit raises on purpose."""

    retriable: bool = False

    @property
    def error_class(self) -> str:
        return type(self).__name__


class RetriableError(PolycommitError):
    """Trying again later may succeed."""

    retriable = True


class PermanentError(PolycommitError):
    """Trying again cannot succeed; the input or the operation is wrong."""

    retriable = False


# -- the event log ---------------------------------------------------------------------------------


class CodecError(PermanentError):
    """An event could not be encoded or decoded."""


class CorruptEventError(CodecError):
    """The bytes are not a polycommit event: bad header, truncated or garbled Avro body."""


class UnknownSchemaError(CodecError):
    """The event names a writer schema (by fingerprint) that this reader has never seen."""


class UnexpectedEventTypeError(CodecError):
    """A valid event of another type arrived on a topic that carries only some types."""


class InvalidEventError(CodecError):
    """A record does not match its schema (a missing field, a wrong type) and cannot be written."""


# -- operations and stores -------------------------------------------------------------------------


class InvalidOperationError(PermanentError):
    """The operation cannot run anywhere: unknown store or kind, missing key, wrong vector size."""


class UnknownStoreError(InvalidOperationError):
    """The operation names a store polycommit does not have."""


class PayloadTooLargeError(InvalidOperationError):
    """The operation's payload exceeds the configured limit."""


class StoreError(PolycommitError):
    """A store refused or failed an operation; `retriable` says whether to try again."""

    def __init__(self, message: str, *, retriable: bool, store: str, code: str | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.store = store
        self.code = code


class StoreUnavailableError(RetriableError):
    """A store cannot be reached right now."""


class VersionConflict(PermanentError):
    """Optimistic concurrency: a key's stored version is not the one the operation expected.

    Permanent for the step (the same write can never succeed against that version): a saga compensates,
    a two-phase commit votes no. The caller reads again and retries (`polycommit.occ.retry_on_conflict`).
    """

    def __init__(self, resource: str, expected: int | None, actual: int | None, *, message: str = "") -> None:
        # `message` alone: a conflict reported by a store through a transaction's result (its text only).
        super().__init__(message or f"{resource}: expected version {expected}, found {actual}")
        self.resource = resource
        self.expected = expected
        self.actual = actual


VersionConflictError = VersionConflict  # the name this class had before optimistic concurrency was built


# -- transactions ----------------------------------------------------------------------------------


class TransactionError(PolycommitError):
    """A transaction did not end as the caller asked."""


class ClientClosedError(TransactionError):
    """The client was closed: nothing more goes out through it. What it sent before still runs to its end
    (its result is on the results topic); a transaction it had open ends by its idle timeout."""


class TransactionTimeoutError(RetriableError):
    """No result arrived for a transaction before the client's deadline; it may still finish."""


class LockTimeoutError(RetriableError):
    """A transaction waited longer than its lock-wait timeout for locks other transactions held. Nothing
    of it ran, so sending it again later may succeed."""


class DeadlockVictimError(RetriableError):
    """The deadlock detector chose this transaction to break a cycle of lock waits: it was aborted while it
    waited, nothing of it ran, and its locks went to the others. Running it again may succeed."""


class TransactionAbortedError(RetriableError):
    """An open interactive transaction is gone: it was idle longer than its lock-wait timeout, chosen as a
    deadlock victim, or released. Nothing of it ran; running it again may succeed."""


class StaleReadError(RetriableError):
    """An interactive transaction locking at its commit found a key it had read changed by the time its
    locks were granted: what it would write rests on a value that is gone. Nothing of it ran; running the
    block again (which reads again) may succeed."""


class InvalidIntentError(PermanentError):
    """The intent cannot be admitted as it was sent: its key, its reply address or a mode it asks for."""


class InvalidReplyToError(InvalidIntentError):
    """`reply_to` names a topic or partition that does not exist, or one of polycommit's own topics."""


class InvalidIntentKeyError(InvalidIntentError):
    """The intent's Kafka key is missing or is not its `tx_id`, which breaks per-transaction ordering."""


class ExpiredIntentError(InvalidIntentError):
    """The intent's transaction was created longer ago than the marker retention
    (POLYCOMMIT_MARKER_RETENTION): its applied-step markers may be pruned, so running it again could apply
    its steps twice. Refused, so the same intent ends the same way within the retention window."""


class UnsupportedError(InvalidIntentError):
    """The intent (or a participant) asks for a mode polycommit does not run yet (the message names it)."""


class ProtocolError(PermanentError):
    """An event that the transaction's protocol can never receive in its state (not a late or duplicate one)."""


class ServerStartError(PolycommitError):
    """A server did not become ready; the message names it and its log file."""


def describe(exc: BaseException) -> tuple[str, str, bool]:
    """(error class, message, retriable) of any exception, for outcome and dead-letter records."""
    if isinstance(exc, PolycommitError):
        return exc.error_class, str(exc), exc.retriable
    return type(exc).__name__, str(exc) or repr(exc), False
