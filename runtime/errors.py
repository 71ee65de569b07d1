"""Domain errors of the runtime, each carrying a one-line reason a user can act on.

Compile errors end kiln-compile with that line on stderr and in the termination
log; serve errors are mapped to HTTP codes in one place (kiln.runtime.inference.STATUS).
"""

from __future__ import annotations

from kiln.manifest import CORRUPT_REASON


class KilnError(Exception):
    """Base: str(error) is the one-line reason shown to users."""

    reason = "Error"


class FetchError(KilnError):
    reason = "FetchFailed"


class DigestMismatch(KilnError):
    reason = "DigestMismatch"


class ArchiveError(KilnError):
    reason = "InvalidArchive"


class ExportError(KilnError):
    reason = "ExportFailed"


class CompileError(KilnError):
    reason = "CompileFailed"


class ValidationFailed(KilnError):
    reason = "ValidationFailed"


class ArtifactMismatch(KilnError):
    """The artifact was built for another torch version or device."""

    reason = "ArtifactMismatch"


class ArtifactCorrupt(ArtifactMismatch):
    """A file of the artifact does not match its manifest's sha256 (the operator recompiles)."""

    reason = CORRUPT_REASON


class InvalidInput(KilnError):
    """A request that does not match the model's signature (HTTP 400)."""

    reason = "InvalidInput"


class ModelNotFound(KilnError):
    reason = "ModelNotFound"


class NotReady(KilnError):
    reason = "NotReady"


class PayloadTooLarge(KilnError):
    """A request body over the configured limit (HTTP 413)."""

    reason = "PayloadTooLarge"


class ModelFailed(KilnError):
    """The model raised while computing a request's batch (HTTP 500; every request of that batch gets it)."""

    reason = "ModelFailed"

    @classmethod
    def of(cls, model: str, exc: Exception) -> ModelFailed:
        return cls(f"model {model!r} failed: {type(exc).__name__}: {exc}")


class Overloaded(KilnError):
    """The request queue is full (HTTP 503 with Retry-After)."""

    reason = "Overloaded"
