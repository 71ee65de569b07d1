"""`kiln-serve`'s entry point: start loading torch's libraries, then import and run the server.

Serve path (standard library only until the server is imported). The preload threads
(kiln.runtime.preload) make a CUDA context, load libtorch and the lean model and warm it up,
while Python imports uvicorn, pydantic and numpy: a lean replica's ready time is the longer of
the two, not their sum.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.runtime.intake_pool import IntakePool
    from kiln.runtime.settings import ServeSettings

# Modules whose import dlopens a C extension (numpy, pydantic_core, _ssl by way of asyncio, …), loaded
# before libtorch: glibc lets one thread dlopen at a time and libtorch keeps that lock for half a second.
EXTENSION_MODULES = (
    "numpy",
    "pydantic_core",
    "asyncio",
    "ssl",
    "socket",
    "select",
    "json",
    "queue",
    "multiprocessing.connection",  # uvicorn's supervisors import it
    "watchfiles",
    "httptools",
    "uuid",  # pydantic's types
    "zoneinfo",
    "csv",  # importlib.metadata, when a package looks up its entry points
    "resource",
    "uvloop",  # uvicorn's event loop where installed
    "encodings.idna",  # unicodedata: uvloop encodes the host it binds with the idna codec
)


def main(argv: list[str] | None = None) -> int:
    # numpy's OpenBLAS starts a thread per core at import (tens of ms on a large node); the
    # serve path never multiplies matrices with numpy, and torch's own pools are set apart.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # OpenMP's workers spin between parallel regions by default: on a CPU replica they took the cores the
    # event loop and the intake processes answer on (MLP, 2 cores, batching on: 1800 → 3100 req/s passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from kiln.runtime import preload
    from kiln.runtime.settings import parse_settings

    args = sys.argv[1:] if argv is None else argv
    settings = parse_settings(args)
    with intakes(settings, args) as pool:
        preload.start(settings)
        for name in EXTENSION_MODULES:
            with contextlib.suppress(ImportError):  # httptools and watchfiles are optional
                importlib.import_module(name)
        preload.release()
        preload.mark("C extensions imported")
        if pool is not None:  # not sooner: their imports slowed this process's (docs/benchmarks.md §12)
            pool.start()
        from kiln.runtime import server

        preload.mark("server imported")
        return server.serve(settings, pool)


@contextlib.contextmanager
def intakes(settings: ServeSettings, args: list[str]) -> Iterator[IntakePool | None]:
    """The intake processes the settings ask for, started before anything heavy is imported (None: none)."""
    from kiln.runtime.intake_pool import IntakePool, intake_count
    from kiln.runtime.preload import cpu_limit

    count = intake_count(settings.intake_processes, cpu_limit())
    if not count:
        yield None
        return
    pool = IntakePool(count, settings.shm_bytes, args, settings.host, settings.port, settings.grpc_port)
    try:
        yield pool
    finally:
        pool.close()


if __name__ == "__main__":
    sys.exit(main())
