"""The artifact cache: `<cache>/<key>/` folders published whole by rename.

Compile path (no torch). A compile builds in a private staging folder beside the
final one and renames it into place, so a reader never sees half an artifact and
two compiles of the same key never write into the same folder.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from kiln.manifest import MANIFEST_NAME, Manifest, corrupt_files


def artifact_dir(cache: Path, key: str) -> Path:
    return cache / key


def is_published(cache: Path, key: str) -> bool:
    return (artifact_dir(cache, key) / MANIFEST_NAME).is_file()


def reusable(cache: Path, key: str, say: Callable[[str], None] = print) -> Manifest | None:
    """The published artifact of `key` if every file matches its sha256; a corrupt one is removed.

    A serving pod that finds the artifact corrupt makes the operator run this key's
    compile again; this is where that compile throws the damaged copy away.
    """
    if not is_published(cache, key):
        return None
    folder = artifact_dir(cache, key)
    try:
        manifest = Manifest.read(folder)
        bad = corrupt_files(folder, manifest.checked_files())
    except (OSError, ValueError, ValidationError) as exc:
        bad = [f"{MANIFEST_NAME} ({exc.__class__.__name__})"]
    if not bad:
        return manifest
    say(f"cached artifact {key} is corrupt ({', '.join(bad)} fail their sha256): removing it and compiling again")
    trash = Path(tempfile.mkdtemp(prefix=f".corrupt-{key}-", dir=cache))
    folder.rename(trash / key)  # one rename: a reader sees the whole folder or none
    shutil.rmtree(trash, ignore_errors=True)
    return None


def staging_dir(cache: Path, key: str) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=cache))


def publish(staging: Path, cache: Path, key: str) -> bool:
    """Rename the staging folder to the key; False when another compile published first."""
    final = artifact_dir(cache, key)
    staging.chmod(0o755)  # mkdtemp makes it private; serving pods run as another user
    try:
        staging.rename(final)
        return True
    except OSError:
        if not is_published(cache, key):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


def remove(cache: Path, key: str) -> None:
    """Delete an artifact and any staging folder of its key (the operator's cache GC Job)."""
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ValueError(f"not a cache key: {key!r}")
    for folder in [artifact_dir(cache, key), *cache.glob(f".staging-{key}-*"), *cache.glob(f".corrupt-{key}-*")]:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`kiln-cache remove --cache DIR --key KEY`."""
    parser = argparse.ArgumentParser(prog="kiln-cache", description="Manage Kiln's artifact cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    rm = sub.add_parser("remove", help="delete one artifact")
    rm.add_argument("--cache", type=Path, required=True)
    rm.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    remove(args.cache, args.key)
    print(f"removed {args.cache / args.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
