"""kiln-compile: real AOTInductor compiles of small models, and every way a compile can fail."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kiln.manifest import Manifest, corrupt_files
from kiln.runtime import cache
from kiln.runtime.errors import ValidationFailed
from kiln.runtime.validate import validate_in_child
from tests.support.serving import Artifact, compile_cmd, run_compile


def test_compile_publishes_package_runner_and_manifest(compiled: dict[str, Artifact]) -> None:
    art = compiled["mlp"]
    manifest = Manifest.read(art.folder)
    assert manifest.key == art.key
    assert [i.name for i in manifest.signature.inputs] == ["x", "y"]
    assert [i.shape for i in manifest.signature.inputs] == [[-1, 16], [-1, 4]]
    assert [o.name for o in manifest.signature.outputs] == ["output0", "output1"]
    assert manifest.validation is not None and manifest.validation.loader == "lean"
    assert manifest.validation.max_abs_error < 1e-3
    package = art.folder / "model.pt2"
    assert package.stat().st_size == manifest.package_bytes
    assert hashlib.sha256(package.read_bytes()).hexdigest() == manifest.package_sha256
    assert (art.folder / manifest.runner_so).is_file()  # type: ignore[operator]
    assert not [p for p in art.cache.iterdir() if p.name.startswith(".staging")]


def test_compile_of_a_key_already_in_the_cache_does_nothing(compiled: dict[str, Artifact], tmp_path: Path) -> None:
    art = compiled["mlp"]
    before = (art.folder / "manifest.json").stat().st_mtime_ns
    proc, term = run_compile(art.archive, art.cache, tmp_path, f"--key={art.key}")
    assert proc.returncode == 0, proc.stderr
    assert "already in the cache" in proc.stdout
    assert json.loads(term)["key"] == art.key
    assert (art.folder / "manifest.json").stat().st_mtime_ns == before


def test_a_corrupt_cached_artifact_is_thrown_away_and_compiled_again(
    compiled: dict[str, Artifact], tmp_path: Path
) -> None:
    """What the operator's rebuild Job does after a serving pod refused the artifact."""
    art = compiled["mlp"]
    own_cache = tmp_path / "cache"
    shutil.copytree(art.folder, own_cache / art.key)
    folder = own_cache / art.key
    so = folder / str(Manifest.read(folder).runner_so)
    data = bytearray(so.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit
    so.write_bytes(bytes(data))
    proc, term = run_compile(art.archive, own_cache, tmp_path, f"--key={art.key}", "--batch-max=16")
    assert proc.returncode == 0, proc.stderr
    assert f"cached artifact {art.key} is corrupt (runner/" in proc.stdout
    assert "already in the cache" not in proc.stdout
    assert json.loads(term)["key"] == art.key
    rebuilt = Manifest.read(folder)
    assert not corrupt_files(folder, rebuilt.checked_files())
    assert sorted(p.name for p in own_cache.iterdir()) == [art.key]  # no trash or staging left behind


def test_digest_mismatch_fails_with_the_reason_in_the_termination_log(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    proc, term = run_compile(archives["mlp"], tmp_path / "cache", tmp_path, "--sha256=" + "0" * 64)
    assert proc.returncode == 1
    assert term.startswith("DigestMismatch: sha256 mismatch") and "expected 000" in term
    assert proc.stderr.strip().splitlines()[-1] == term
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("ftp://example.invalid/model.pt2", "unsupported URI scheme 'ftp'"),
        ("file:///nonexistent/model.pt2", "FetchFailed: archive not found: /nonexistent/model.pt2"),
        ("pvc://claim/../../etc/passwd", "bad pvc:// URI"),
    ],
)
def test_unfetchable_archives_fail_with_one_clear_line(uri: str, expected: str, tmp_path: Path) -> None:
    term = tmp_path / "term"
    proc = subprocess.run(
        [
            *compile_cmd(Path("/unused"), tmp_path, term)[:1],
            f"--uri={uri}",
            f"--cache={tmp_path}",
            f"--termination-log={term}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert expected in term.read_text()
    assert "Traceback" not in proc.stderr


def test_a_file_that_is_not_an_exported_program_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt2"
    bogus.write_bytes(b"this is not a zip archive" * 10)
    proc, term = run_compile(bogus, tmp_path / "cache", tmp_path)
    assert proc.returncode == 1
    assert term.startswith("InvalidArchive: archive is not an ExportedProgram")


def test_an_archive_over_the_size_limit_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    proc, term = run_compile(archives["mlp"], tmp_path / "cache", tmp_path, "--max-archive-bytes=1000")
    assert proc.returncode == 1
    assert "larger than the limit of 1000 bytes" in term


def test_a_library_that_crashes_on_load_fails_validation_instead_of_serving(
    compiled: dict[str, Artifact], tmp_path: Path
) -> None:
    """The GPU finding: a segfault while loading must be a compile failure, not a crash-looping pod."""
    folder = tmp_path / "artifact"
    shutil.copytree(compiled["mlp"].folder, folder)
    manifest = Manifest.read(folder)
    crash_c = tmp_path / "crash.c"
    crash_c.write_text("#include <signal.h>\n__attribute__((constructor)) static void boom(void) { raise(SIGSEGV); }\n")
    so = folder / str(manifest.runner_so)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(crash_c)], check=True)
    manifest.model_copy(update={"runner_so_sha256": hashlib.sha256(so.read_bytes()).hexdigest()}).write(folder)
    reference = tmp_path / "reference.pt2"
    shutil.copy(compiled["mlp"].archive, reference)
    with pytest.raises(ValidationFailed, match="crashed the process \\(SIGSEGV\\)"):
        validate_in_child(folder, reference, "cpu", [1, 2], 1e-3, 1e-2, timeout=120)


def test_two_compiles_of_one_key_publish_one_whole_artifact(tmp_path: Path) -> None:
    first, second = cache.staging_dir(tmp_path, "k"), cache.staging_dir(tmp_path, "k")
    for folder, text in ((first, "first"), (second, "second")):
        (folder / "model.pt2").write_text(text)
        (folder / "manifest.json").write_text("{}")
    assert cache.publish(first, tmp_path, "k") is True
    assert cache.publish(second, tmp_path, "k") is False
    assert (tmp_path / "k" / "model.pt2").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
