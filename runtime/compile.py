"""`kiln-compile`: fetch → read the archive → dynamic batch → build the artifact → validate → publish.

The artifact is an AOTInductor library (aot, the default), an OpenVINO IR (aot with
backend openvino), a TorchScript file (TorchScript archives), or an ExportedProgram
that jit/eager replicas load (archives whose model.py must run only here).

Compile path entry point, run once per cache key by the compile Job. Each step
prints a progress line with its duration. Any failure exits non-zero with one
line on stderr and in the termination log, which the operator copies to status.
On success the termination log holds the JSON summary the operator reads
(kiln.contracts.CompileSummary: key, path, size, sha256, seconds, torch version, dims).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError as SpecError

from kiln.api import ArchiveFormat, CompileBackend, CompileMode, CompileSpec, DynamicBatch, InductorMode
from kiln.contracts import CompileSummary
from kiln.enums import Engine
from kiln.keys import cache_key, key_inputs
from kiln.manifest import BATCH, PACKAGE_NAME, RUNNER_DIR, Manifest, Signature, sha256_file
from kiln.runtime import cache
from kiln.runtime.errors import KilnError
from kiln.runtime.unpack import Limits

if TYPE_CHECKING:
    from kiln.runtime.formats import Source

DEFAULT_MAX_ARCHIVE = 8 << 30


@dataclass(frozen=True)
class CompileArgs:
    """Inputs of one compile, parsed in main()."""

    uri: str
    sha256: str | None
    format: ArchiveFormat
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
    p.add_argument(
        "--mode",
        default=CompileMode.aot.value,
        choices=[m.value for m in CompileMode],
        help="aot compiles; jit and eager only prepare an ExportedProgram (or TorchScript) for replicas",
    )
    p.add_argument("--backend", default=CompileBackend.inductor.value, choices=[b.value for b in CompileBackend])
    p.add_argument("--inductor-mode", default="default", choices=[m.value for m in InductorMode])
    p.add_argument("--batch-min", type=int, default=1)
    p.add_argument("--batch-max", type=int, default=32)
    p.add_argument("--batch-dim", type=int, default=0, help="the batch dimension of every input and output")
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
            mode=CompileMode(a.mode),
            backend=CompileBackend(a.backend),
            inductor_mode=InductorMode(a.inductor_mode),
            dynamic_batch=DynamicBatch(min=a.batch_min, max=a.batch_max, dim=a.batch_dim),
            options=dict(a.option),
        )
    except SpecError as exc:
        p.error(str(exc.errors()[0]["msg"]))
    return CompileArgs(
        uri=a.uri,
        sha256=a.sha256,
        format=ArchiveFormat(a.format),
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


def validation_points(signature: Signature) -> list[dict[str, int]]:
    """Sizes of the dynamic dimensions to compare at: the batch sizes of validation_batches, then the
    minimum, a middle size and the maximum of every other dimension, one at a time (all at once could
    need more memory than any request may use)."""
    lows = {name: rng.min for name, rng in signature.dims.items()}
    points = []
    if BATCH in signature.dims:
        points = [lows | {BATCH: b} for b in validation_batches(signature.dims[BATCH].min, signature.dims[BATCH].max)]
    for name, rng in signature.dims.items():
        if name != BATCH:
            points += [lows | {name: size} for size in sorted({rng.min, (rng.min + rng.max) // 2, rng.max})]
    unique = {tuple(sorted(p.items())): p for p in points or [lows]}
    return list(unique.values())


def run(args: CompileArgs) -> Manifest:
    """The compile proper; raises KilnError with a one-line reason."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kiln-compile-"))
    try:
        return _compile(args, work, start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def engine_for(fmt: ArchiveFormat, spec: CompileSpec) -> Engine:
    """What the artifact holds: TorchScript stays TorchScript; jit and eager replicas get a program."""
    if fmt == ArchiveFormat.torchscript:
        return Engine.torchscript
    if spec.mode != CompileMode.aot:
        return Engine.exported_program
    return Engine.openvino if spec.backend == CompileBackend.openvino else Engine.aotinductor


NOTES: dict[Engine, str] = {
    Engine.torchscript: "served as TorchScript: a TorchScript archive cannot be compiled ahead of time",
    Engine.exported_program: "prepared as an ExportedProgram for {mode} replicas: no ahead-of-time compile",
}


def _compile(args: CompileArgs, work: Path, start: float) -> Manifest:
    from kiln.runtime.fetch import fetch

    if args.key and (cached := cache.reusable(args.cache_dir, args.key, progress)):
        progress(f"artifact {args.key} is already in the cache and whole; nothing to do")
        return cached
    with step(f"fetch {args.uri}"):
        fetched = fetch(
            args.uri, work / "archive", sha256=args.sha256, max_bytes=args.max_archive_bytes, pvc_root=args.pvc_root
        )
        progress(f"fetched {fetched.size} bytes, sha256 {fetched.sha256}")
    key = args.key or cache_key(fetched.sha256, args.spec, args.target, args.runtime_image)
    progress(f"cache key {key}")
    if cached := cache.reusable(args.cache_dir, key, progress):
        progress("artifact already in the cache and whole; nothing to do")
        return cached

    with step("import torch"):
        import torch

        from kiln.runtime.formats import prepare
        from kiln.runtime.torch_loaders import device_capability
        from kiln.runtime.validate import validate_in_child
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KilnError("--device cuda but no CUDA device is visible to this process")
    batch = args.spec.dynamic_batch
    engine = engine_for(args.format, args.spec)
    limits = Limits(max_bytes=args.max_archive_bytes)
    with step(
        f"read the {args.format.value} archive; batch dimension {batch.dim} dynamic in [{batch.min}, {batch.max}]"
    ):
        source = prepare(fetched.path, args.format, work, batch, args.device, limits)
        progress(f"dynamic dimensions: {source.signature.describe_dims() or 'none'}")
        reference = source.script or work / "reference.pt2"
        if source.program is not None:
            torch.export.save(source.program, str(reference))

    staging = cache.staging_dir(args.cache_dir, key)
    try:
        built = _build(engine, source, reference, staging, args)
        manifest = Manifest(
            engine=engine,
            key=key,
            inputs=key_inputs(fetched.sha256, args.spec, args.target, args.runtime_image) | {"uri": args.uri},
            torch_version=torch.__version__,
            device="cuda" if args.device == "cuda" else "cpu",
            device_name=torch.cuda.get_device_name() if args.device == "cuda" else None,
            device_capability=device_capability(args.device),
            signature=source.signature,
            batch_min=batch.min,
            batch_max=batch.max,
            batch_dim=batch.dim,
            note=NOTES[engine].format(mode=args.spec.mode.value) if engine in NOTES else None,
            **built,
        )
        manifest.write(staging)
        points = validation_points(source.signature)
        shown = ", ".join(" ".join(f"{k}={v}" for k, v in p.items()) for p in points)
        with step(f"validate in a child process at {len(points)} sizes ({shown})"):
            validation = validate_in_child(
                staging, reference, args.device, points, args.atol, args.rtol, args.validate_timeout
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
    progress(f"built the {engine} artifact in {time.monotonic() - start:.1f} s: {manifest.package_bytes} bytes")
    return manifest


def _build(engine: Engine, source: Source, reference: Path, staging: Path, args: CompileArgs) -> dict[str, Any]:
    """Write the engine's files into `staging`; the manifest fields that describe them."""

    compile_start = time.monotonic()
    extra: dict[str, Any] = {}
    others: list[Path] = []
    if engine == Engine.aotinductor:
        from kiln.runtime import aot

        configs = aot.inductor_configs(args.spec)
        assert source.program is not None  # only TorchScript comes without a program, and it has its own engine
        with step(f"AOTInductor compile (configs {configs or 'default'})"):
            aot.compile_package(source.program, staging / PACKAGE_NAME, configs)
        compile_seconds = time.monotonic() - compile_start
        with step("extract runner library"):
            so = aot.extract_runner(staging / PACKAGE_NAME, staging / RUNNER_DIR)
        package = staging / PACKAGE_NAME
        extra = {"runner_so": str(so.relative_to(staging)), "runner_so_sha256": sha256_file(so)}
    elif engine == Engine.openvino:
        from kiln.runtime import openvino_ir

        assert source.program is not None
        with step("OpenVINO: convert to IR and compile the CPU blob"):
            package, *others = openvino_ir.build(source.program, staging)
        compile_seconds = time.monotonic() - compile_start
        extra = {"files": {p.name: sha256_file(p) for p in others}}
    else:
        package = staging / ("model.ts" if engine == Engine.torchscript else "program.pt2")
        with step(f"store the {engine}"):
            shutil.copyfile(reference, package)
        compile_seconds = time.monotonic() - compile_start
    return {
        "package_file": package.name,
        "package_bytes": sum(p.stat().st_size for p in [package, *others]),
        "package_sha256": sha256_file(package),
        "compile_seconds": round(compile_seconds, 3),
        **extra,
    }


def summary(manifest: Manifest, cache_dir: Path) -> str:
    """What the operator reads from the termination log on success (< 4 KiB)."""
    return CompileSummary(
        key=manifest.key,
        path=str(cache.artifact_dir(cache_dir, manifest.key)),
        size_bytes=manifest.package_bytes,
        sha256=manifest.package_sha256,
        compile_seconds=manifest.compile_seconds,
        torch_version=manifest.torch_version,
        device_capability=manifest.device_capability,
        engine=manifest.engine,
        dims=manifest.signature.describe_dims(),
        note=manifest.note,
    ).to_json()


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
