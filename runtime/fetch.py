"""Fetch a model archive to a local file: streamed, size-bounded, sha256 verified.

Compile path. file:// and pvc:// are read from disk; https://, s3:// and gs:// go
through fsspec (s3fs and gcsfs are optional extras).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from kiln.runtime.errors import DigestMismatch, FetchError

CHUNK = 1 << 20
REMOTE_SCHEMES = {"http", "https", "s3", "gs"}
EXTRAS = {"s3": "s3fs (pip install 'kiln[s3]')", "gs": "gcsfs (pip install 'kiln[gcs]')"}


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int


def resolve_local(uri: str, pvc_root: Path) -> Path | None:
    """The local path of a file:// or pvc://CLAIM/PATH URI, None for remote ones."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "pvc":
        rel = Path(parsed.netloc) / unquote(parsed.path).lstrip("/")
        if not parsed.netloc or ".." in rel.parts:
            raise FetchError(f"bad pvc:// URI {uri!r}: expected pvc://CLAIM/PATH without '..'")
        return pvc_root / rel
    if parsed.scheme in REMOTE_SCHEMES:
        return None
    raise FetchError(
        f"unsupported URI scheme {parsed.scheme!r} in {uri!r}: use file://, https://, s3://, gs:// or pvc://"
    )


@contextmanager
def open_source(uri: str, pvc_root: Path) -> Iterator[BinaryIO]:
    local = resolve_local(uri, pvc_root)
    if local is not None:
        try:
            with local.open("rb") as fh:
                yield fh
        except FileNotFoundError as exc:
            raise FetchError(f"archive not found: {local} (from {uri})") from exc
        return
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a runtime dependency
        raise FetchError("fsspec is required for remote archives") from exc
    scheme = urlparse(uri).scheme
    try:
        with fsspec.open(uri, "rb") as fh:
            yield fh
    except ImportError as exc:
        raise FetchError(f"{scheme}:// needs {EXTRAS.get(scheme, exc.name)}") from exc
    except (OSError, ValueError) as exc:
        raise FetchError(f"cannot fetch {uri}: {exc.__class__.__name__}: {exc}") from exc


def fetch(uri: str, dest: Path, *, sha256: str | None, max_bytes: int, pvc_root: Path) -> Fetched:
    """Copy `uri` to `dest` in chunks, refusing more than `max_bytes`."""
    digest = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open_source(uri, pvc_root) as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"archive {uri} is larger than the limit of {max_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    actual = digest.hexdigest()
    if sha256 and actual != sha256.lower():
        raise DigestMismatch(f"sha256 mismatch for {uri}: expected {sha256}, got {actual}")
    return Fetched(dest, actual, size)
