"""`kiln-serve`'s entry point: start loading torch's libraries, then import and run the server.

Serve path (standard library only until the server is imported). The preload thread
(kiln.runtime.preload) loads libtorch, a CUDA context and the lean model, and calls it once,
while Python imports uvicorn, pydantic and numpy: a lean replica's ready time is the longer of
the two, not their sum.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    # numpy's OpenBLAS starts a thread per core at import (tens of ms on a large node); the
    # serve path never multiplies matrices with numpy, and torch's own pools are set apart.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from kiln.runtime import preload

    preload.start(sys.argv[1:] if argv is None else argv)
    from kiln.runtime import server

    preload.mark("server imported")

    return server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
