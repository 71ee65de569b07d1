"""Unpacking user archives: traversal, links, special files and decompression bombs are refused."""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from kiln.runtime.errors import ArchiveError
from kiln.runtime.unpack import Limits, unpack


def tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_files_and_folders_are_unpacked_in_place(tmp_path: Path) -> None:
    archive = tar_with(tmp_path / "a.tar.gz", (entry("m/model.py"), b"x = 1\n"), (entry("m/kiln.yaml"), b"inputs: []"))
    out = unpack(archive, tmp_path / "out")
    assert (out / "m" / "model.py").read_text() == "x = 1\n"


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (entry("../escape.py"), "would be written outside the archive's folder (path traversal)"),
        (entry("/etc/cron.d/evil"), "would be written outside the archive's folder (path traversal)"),
        (entry("model.py", tarfile.SYMTYPE, "/etc/passwd"), "is a symlink; only files and folders are accepted"),
        (entry("model.py", tarfile.LNKTYPE, "/etc/passwd"), "is a hard link; only files and folders are accepted"),
        (entry("dev", tarfile.CHRTYPE), "is a special file; only files and folders are accepted"),
    ],
)
def test_hostile_tar_members_are_refused(member: tarfile.TarInfo, expected: str, tmp_path: Path) -> None:
    archive = tar_with(tmp_path / "evil.tar.gz", (member, b"boom"))
    with pytest.raises(ArchiveError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "escape.py").exists()


def test_a_zip_bomb_is_refused_by_its_expansion_ratio(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.pt", b"\0" * (64 << 20))
    with pytest.raises(ArchiveError, match=r"expands [0-9]+x: refused as a decompression bomb"):
        unpack(bomb, tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_tar_that_unpacks_past_the_size_limit_is_refused(tmp_path: Path) -> None:
    archive = tar_with(tmp_path / "big.tar.gz", (entry("model.pt"), b"\0" * (4 << 20)))
    with pytest.raises(ArchiveError, match="unpacks to more than 1000000 bytes"):
        unpack(archive, tmp_path / "out", Limits(max_bytes=1_000_000))


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    archive = tar_with(tmp_path / "many.tar.gz", *[(entry(f"f{i}"), b"") for i in range(20)])
    with pytest.raises(ArchiveError, match="more than 10 members"):
        unpack(archive, tmp_path / "out", Limits(max_members=10))


def test_zip_symlinks_and_traversal_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as z:
        info = zipfile.ZipInfo("model.py")
        info.external_attr = 0o120777 << 16  # a symlink, as `zip --symlinks` stores it
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="is a symlink or special file"):
        unpack(link, tmp_path / "out")
    traversal = tmp_path / "traversal.zip"
    with zipfile.ZipFile(traversal, "w") as z:
        z.writestr("../../escape.py", "x")
    with pytest.raises(ArchiveError, match="path traversal"):
        unpack(traversal, tmp_path / "out2")


def test_a_file_that_is_no_archive_is_named(tmp_path: Path) -> None:
    plain = tmp_path / "model.bin"
    plain.write_bytes(b"not an archive at all")
    with pytest.raises(ArchiveError, match=re.escape("model.bin is neither a .tar(.gz) nor a .zip archive")):
        unpack(plain, tmp_path / "out")
