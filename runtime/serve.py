"""`kiln-serve`'s entry point: start loading torch's libraries, then import and run the server.

Serve path (standard library only until the server is imported). The preload thread
(kiln.runtime.preload) loads libtorch and a CUDA context while Python imports uvicorn,
pydantic and numpy: a lean replica's ready time is the longer of the two, not their sum.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from kiln.runtime import preload

    preload.start(sys.argv[1:] if argv is None else argv)
    from kiln.runtime import server

    return server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
