"""kiln-serve settings: one dataclass, parsed from flags and KILN_* environment in main().

Serve path (standard library only: the preload reads these first). Flags win over
environment; nothing is read at import. The operator writes these flags from
kiln.contracts.ServeFlags, and a unit test parses what it writes here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from kiln.enums import CompileMode, JitBackend, WarmSizes


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _choice(kind: type[Enum]) -> Any:
    def parse(text: str) -> Enum:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(kind)}, not {text!r}") from None

    return parse


def opt(default: object, doc: str) -> Any:
    """A settings field with its documentation, shown by --help."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = opt("model", "Name the model is served under: /v2/models/{name}.")
    mode: CompileMode = opt(
        CompileMode.aot,
        "aot: load the compiled artifact; jit: torch.compile the program at start; eager: run it as is.",
    )
    artifact: str = opt(
        "", "The artifact folder `<cache>/<key>` kiln-compile published (aot; jit/eager for prepared archives)."
    )
    archive: str = opt("", "jit/eager: URI of the ExportedProgram archive.")
    archive_sha256: str = opt("", "jit/eager: expected sha256 of the archive.")
    device: str = opt("cpu", "cpu or cuda.")
    host: str = opt("0.0.0.0", "Address to bind.")
    port: int = opt(8080, "Port to bind.")
    grpc_port: int = opt(0, "Port of the Open Inference Protocol's gRPC service, on the same address; 0: none.")
    max_batch_size: int = opt(32, "Most rows merged into one model call (capped by the artifact's compiled maximum).")
    max_delay_ms: float = opt(
        2.0, "How long the first request of a batch waits for others; 0 merges only what is queued."
    )
    wait_arriving: bool = opt(
        True,
        "With intake processes: a batch waits (within --max-delay-ms) for request bodies they are still "
        "receiving; false: only for requests already in this process.",
    )
    warm_batch_sizes: WarmSizes = opt(
        WarmSizes.auto,
        "every: once ready, the model thread calls the model once at every batch size up to the largest while "
        "no request waits (on a GPU a size's first call in a thread costs 20-50 ms of cuDNN planning, which "
        "stalls every request in flight); ends: only 1, 2 and the largest; auto: every on a GPU for compiled "
        "libraries, else ends.",
    )
    grow_batches: bool = opt(
        True,
        "On a GPU: past --max-delay-ms a batch keeps taking requests while the GPU still holds two earlier "
        "batches (it could not start sooner); false: it closes at --max-delay-ms.",
    )
    max_queue: int = opt(256, "Requests waiting for the model beyond which new ones get 503 with Retry-After.")
    max_body_bytes: int = opt(64 << 20, "Largest request body accepted (413 above).")
    inductor_mode: str = opt("default", "jit: torch.compile mode.")
    jit_fullgraph: bool = opt(False, "jit: torch.compile(fullgraph=...): fail instead of breaking the graph.")
    jit_dynamic: str = opt("auto", "jit: torch.compile(dynamic=...): true, false or auto (None).")
    jit_backend: JitBackend = opt(JitBackend.inductor, "jit: torch.compile backend.")
    jit_disable: bool = opt(False, "jit: serve without torch.compile (torch.compile(disable=True)).")
    batch_dim: int = opt(0, "jit/eager archives: the batch dimension (artifacts record theirs in the manifest).")
    batchable: bool = opt(True, "false: never merge requests (each runs alone), for models whose inputs must not mix.")
    intra_op_threads: int = opt(0, "torch intra-op threads (OpenVINO: inference threads); 0: the pod's CPU limit.")
    inter_op_threads: int = opt(0, "torch inter-op threads; 0: torch's default.")
    intake_processes: int = opt(
        -1,
        "Processes that accept HTTP and parse requests for the one model process (tensors pass through shared "
        "memory); 0: none, the model process serves HTTP itself; -1: the pod's CPU limit less one, at most 4, "
        "and none below 4 CPUs.",
    )
    shm_bytes: int = opt(256 << 20, "Shared memory per intake process for request tensors, and as much for answers.")
    drain_seconds: float = opt(
        0.0, "On SIGTERM, report not-ready and keep serving this long first, while endpoints drop the pod."
    )
    graceful_seconds: int = opt(20, "On SIGTERM, how long in-flight requests may take to finish.")
    pvc_root: str = opt("/mnt/pvc", "Where pvc://CLAIM/ archives are mounted.")
    log_level: str = opt("info", "Log level of the server.")


def parse_settings(argv: list[str] | None) -> ServeSettings:
    parser = argparse.ArgumentParser(
        prog="kiln-serve", description="Serve a model over the Open Inference Protocol v2."
    )
    for f in fields(ServeSettings):
        flag = "--" + f.name.replace("_", "-")
        kind: Any = _flag if isinstance(f.default, bool) else type(f.default)
        if isinstance(f.default, Enum):
            kind = _choice(type(f.default))
        env = os.environ.get("KILN_" + f.name.upper())
        default = kind(env) if env is not None else f.default
        doc = f"{f.metadata['doc']} (env KILN_{f.name.upper()})"
        parser.add_argument(flag, type=kind, default=default, help=doc)
    ns = parser.parse_args(argv)
    settings = ServeSettings(**vars(ns))
    if settings.mode == "aot" and not settings.artifact:
        parser.error("--mode aot needs --artifact (the <cache>/<key> folder)")
    if settings.mode != "aot" and not (settings.archive or settings.artifact):
        parser.error(
            f"--mode {settings.mode} needs --archive (an ExportedProgram) or --artifact (prepared by kiln-compile)"
        )
    if settings.jit_dynamic not in ("auto", "true", "false"):
        parser.error(f"--jit-dynamic must be true, false or auto, not {settings.jit_dynamic!r}")
    return settings
