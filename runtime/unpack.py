"""Unpack .tar(.gz) and .zip archives safely: no path leaves the folder, nothing but files and folders, bounded size.

Compile path (no torch). Archives come from users: a member named `../x` or `/etc/x`,
a symlink or device, or a decompression bomb is refused with a reason, before
anything of it reaches the disk outside the destination.
"""

from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kiln.runtime.errors import ArchiveError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one archive may hold once unpacked."""

    max_bytes: int = 8 << 30
    max_members: int = 10_000
    # A zip member that expands more than this many times is treated as a bomb.
    max_ratio: int = 1000


def kind_of(path: Path) -> str | None:
    """'tar' or 'zip' by content (not by name), else None."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        return None
    return None


def _safe_name(name: str) -> PurePosixPath:
    member = PurePosixPath(name)
    if member.is_absolute() or ".." in member.parts or "\\" in name or name.startswith("~"):
        raise ArchiveError(f"archive member {name!r} would be written outside the archive's folder (path traversal)")
    return member


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits, self.bytes, self.members = limits, 0, 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(f"archive has more than {self.limits.max_members} members (at {name!r})")

    def spend(self, name: str, size: int) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise ArchiveError(
                f"archive unpacks to more than {self.limits.max_bytes} bytes (at {name!r}): "
                "refused as a decompression bomb"
            )


def _copy(src: object, target: Path, name: str, budget: _Budget) -> int:
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while chunk := src.read(CHUNK):  # type: ignore[attr-defined]
            written += len(chunk)
            budget.spend(name, len(chunk))
            out.write(chunk)
    return written


def _unpack_tar(path: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(path) as archive:
        for info in archive:
            budget.member(info.name)
            member = _safe_name(info.name)
            if info.isdir():
                (dest / member).mkdir(parents=True, exist_ok=True)
                continue
            if not info.isfile():
                what = "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
                raise ArchiveError(f"archive member {info.name!r} is a {what}; only files and folders are accepted")
            src = archive.extractfile(info)
            assert src is not None  # a regular file always has data
            _copy(src, dest / member, info.name, budget)


def _unpack_zip(path: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            budget.member(info.filename)
            member = _safe_name(info.filename)
            mode = info.external_attr >> 16
            if mode and (mode & 0o170000) not in (0, 0o100000, 0o040000):
                raise ArchiveError(
                    f"archive member {info.filename!r} is a symlink or special file; only files are accepted"
                )
            if info.is_dir():
                (dest / member).mkdir(parents=True, exist_ok=True)
                continue
            if info.compress_size and info.file_size > budget.limits.max_ratio * info.compress_size:
                raise ArchiveError(
                    f"archive member {info.filename!r} expands {info.file_size // info.compress_size}x: "
                    "refused as a decompression bomb"
                )
            with archive.open(info) as src:
                written = _copy(src, dest / member, info.filename, budget)
            if written != info.file_size:
                raise ArchiveError(
                    f"archive member {info.filename!r} is {written} bytes, its header says {info.file_size}"
                )


def unpack(path: Path, dest: Path, limits: Limits = Limits()) -> Path:
    """Unpack a tar (any compression) or zip archive into `dest`; returns `dest`."""
    kind = kind_of(path)
    if kind is None:
        raise ArchiveError(f"{path.name} is neither a .tar(.gz) nor a .zip archive")
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limits)
    try:
        (_unpack_zip if kind == "zip" else _unpack_tar)(path, dest, budget)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"cannot unpack {path.name}: {exc.__class__.__name__}: {exc}") from exc
    return dest
