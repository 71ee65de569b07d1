"""`kiln-compile`: fetch → load → dynamic batch → AOTInductor → validate → publish.

Compile path entry point, run once per cache key by the compile Job. Each step
prints a progress line with its duration. Any failure exits non-zero with one
line on stderr and in the termination log, which the operator copies to status.
On success the termination log holds a JSON summary (key, size, sha256, seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError as SpecError

from kiln.api import ArchiveFormat, CompileSpec, DynamicBatch, InductorMode
from kiln.keys import cache_key, key_inputs
from kiln.manifest import PACKAGE_NAME, RUNNER_DIR, Manifest
from kiln.runtime import cache
from kiln.runtime.errors import KilnError

DEFAULT_MAX_ARCHIVE = 8 << 30


@dataclass(frozen=True)
class CompileArgs:
    """Inputs of one compile, parsed in main()."""

    uri: str
    sha256: str | None
    spec: CompileSpec
    device: str
    target: str
    cache_dir: Path
    key: str | None
    runtime_image: str
    termination_log: Path
    max_archive_bytes: int
    pvc_root: Path
    atol: float
    rtol: float
    validate_timeout: float


def progress(message: str) -> None:
    print(f"[kiln-compile] {message}", flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    progress(f"{name} ...")
    start = time.monotonic()
    yield
    progress(f"{name} done in {time.monotonic() - start:.2f} s")


def _option(text: str) -> tuple[str, str]:
    name, _, raw = text.partition("=")
    return name, raw


def parse_args(argv: list[str] | None) -> CompileArgs:
    p = argparse.ArgumentParser(prog="kiln-compile", description=__doc__.splitlines()[0])
    p.add_argument("--uri", required=True, help="archive URI: file://, https://, s3://, gs://, pvc://CLAIM/PATH")
    p.add_argument("--sha256", help="expected hex sha256 of the archive")
    p.add_argument("--format", default=ArchiveFormat.exported_program.value, choices=[f.value for f in ArchiveFormat])
    p.add_argument("--inductor-mode", default="default", choices=[m.value for m in InductorMode])
    p.add_argument("--batch-min", type=int, default=1)
    p.add_argument("--batch-max", type=int, default=32)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=_option,
        metavar="NAME=VALUE",
        help="inductor config, repeatable (e.g. freezing=true)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--target", help="target name recorded in the key (GPU product or cpu); default: --device")
    p.add_argument("--cache", required=True, type=Path, help="cache folder; the artifact goes to <cache>/<key>/")
    p.add_argument("--key", help="cache key computed by the operator; default: computed here")
    p.add_argument("--runtime-image", default="local", help="runtime image, part of the key")
    p.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"))
    p.add_argument("--max-archive-bytes", type=int, default=DEFAULT_MAX_ARCHIVE)
    p.add_argument("--pvc-root", type=Path, default=Path("/mnt/pvc"), help="where pvc://CLAIM/ is mounted")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-2)
    p.add_argument("--validate-timeout", type=float, default=600.0)
    a = p.parse_args(argv)
    try:
        spec = CompileSpec(
            inductor_mode=InductorMode(a.inductor_mode),
            dynamic_batch=DynamicBatch(min=a.batch_min, max=a.batch_max),
            options=dict(a.option),
        )
    except SpecError as exc:
        p.error(str(exc.errors()[0]["msg"]))
    return CompileArgs(
        uri=a.uri,
        sha256=a.sha256,
        spec=spec,
        device=a.device,
        target=a.target or a.device,
        cache_dir=a.cache,
        key=a.key,
        runtime_image=a.runtime_image,
        termination_log=a.termination_log,
        max_archive_bytes=a.max_archive_bytes,
        pvc_root=a.pvc_root,
        atol=a.atol,
        rtol=a.rtol,
        validate_timeout=a.validate_timeout,
    )


def validation_batches(bmin: int, bmax: int) -> list[int]:
    return sorted({bmin, min(bmin + 2, bmax), (bmin + bmax) // 2, bmax})


def run(args: CompileArgs) -> Manifest:
    """The compile proper; raises KilnError with a one-line reason."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kiln-compile-"))
    try:
        return _compile(args, work, start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compile(args: CompileArgs, work: Path, start: float) -> Manifest:
    from kiln.runtime.fetch import fetch

    if args.key and cache.is_published(args.cache_dir, args.key):
        progress(f"artifact {args.key} is already in the cache; nothing to do")
        return Manifest.read(cache.artifact_dir(args.cache_dir, args.key))
    with step(f"fetch {args.uri}"):
        fetched = fetch(
            args.uri, work / "archive.pt2", sha256=args.sha256, max_bytes=args.max_archive_bytes, pvc_root=args.pvc_root
        )
        progress(f"fetched {fetched.size} bytes, sha256 {fetched.sha256}")
    key = args.key or cache_key(fetched.sha256, args.spec, args.target, args.runtime_image)
    progress(f"cache key {key}")
    if cache.is_published(args.cache_dir, key):
        progress("artifact already in the cache; nothing to do")
        return Manifest.read(cache.artifact_dir(args.cache_dir, key))

    with step("import torch"):
        import torch

        from kiln.runtime import aot
        from kiln.runtime.export import load_exported, signature_of, with_dynamic_batch
        from kiln.runtime.loader import device_capability, sha256_file
        from kiln.runtime.validate import validate_in_child
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KilnError("--device cuda but no CUDA device is visible to this process")
    with step("load exported program"):
        program = load_exported(fetched.path)
    batch = args.spec.dynamic_batch
    with step(f"make batch dimension dynamic [{batch.min}, {batch.max}]"):
        program = with_dynamic_batch(program, batch.min, batch.max, args.device)
        signature = signature_of(program)
        reference = work / "reference.pt2"
        torch.export.save(program, str(reference))

    staging = cache.staging_dir(args.cache_dir, key)
    try:
        configs = aot.inductor_configs(args.spec)
        with step(f"AOTInductor compile (configs {configs or 'default'})"):
            compile_start = time.monotonic()
            aot.compile_package(program, staging / PACKAGE_NAME, configs)
            compile_seconds = time.monotonic() - compile_start
        with step("extract runner library"):
            so = aot.extract_runner(staging / PACKAGE_NAME, staging / RUNNER_DIR)
        manifest = Manifest(
            key=key,
            inputs=key_inputs(fetched.sha256, args.spec, args.target, args.runtime_image) | {"uri": args.uri},
            torch_version=torch.__version__,
            device="cuda" if args.device == "cuda" else "cpu",
            device_name=torch.cuda.get_device_name() if args.device == "cuda" else None,
            device_capability=device_capability(args.device),
            signature=signature,
            batch_min=batch.min,
            batch_max=batch.max,
            package_bytes=(staging / PACKAGE_NAME).stat().st_size,
            package_sha256=sha256_file(staging / PACKAGE_NAME),
            runner_so=str(so.relative_to(staging)),
            runner_so_sha256=sha256_file(so),
            compile_seconds=round(compile_seconds, 3),
        )
        manifest.write(staging)
        batches = validation_batches(batch.min, batch.max)
        with step(f"validate in a child process at batch sizes {batches}"):
            validation = validate_in_child(
                staging, reference, args.device, batches, args.atol, args.rtol, args.validate_timeout
            )
            progress(
                f"max abs error {validation.max_abs_error:.3g}, max rel error "
                f"{validation.max_rel_error:.3g}, loader {validation.loader}"
            )
        manifest = manifest.model_copy(update={"validation": validation})
        manifest.write(staging)
        with step(f"publish {args.cache_dir / key}"):
            if not cache.publish(staging, args.cache_dir, key):
                progress("another compile published this key first; keeping it")
                return Manifest.read(cache.artifact_dir(args.cache_dir, key))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"compiled in {time.monotonic() - start:.1f} s: {manifest.package_bytes} bytes")
    return manifest


def summary(manifest: Manifest, cache_dir: Path) -> str:
    """What the operator reads from the termination log on success (< 4 KiB)."""
    return json.dumps(
        {
            "key": manifest.key,
            "path": str(cache.artifact_dir(cache_dir, manifest.key)),
            "sizeBytes": manifest.package_bytes,
            "sha256": manifest.package_sha256,
            "compileSeconds": manifest.compile_seconds,
            "torchVersion": manifest.torch_version,
            "deviceCapability": manifest.device_capability,
        },
        separators=(",", ":"),
    )


def write_termination(path: Path, message: str) -> None:
    try:
        path.write_text(message[:4000])
    except OSError as exc:
        print(f"[kiln-compile] cannot write termination log {path}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = run(args)
    except KilnError as exc:
        reason = f"{exc.reason}: {exc}".replace("\n", " ")
    except Exception as exc:  # an unforeseen failure still gets one clear line
        reason = f"InternalError: {exc.__class__.__name__}: {exc}".replace("\n", " ")
    else:
        write_termination(args.termination_log, summary(manifest, args.cache_dir))
        return 0
    print(reason, file=sys.stderr, flush=True)
    write_termination(args.termination_log, reason)
    return 1


if __name__ == "__main__":
    sys.exit(main())
