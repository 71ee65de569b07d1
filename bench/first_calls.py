"""What a batch size's first call costs after the replica is ready: the model loaded as a pod loads it
(the lean loader where it can run), warmed up as kiln-serve warms it, then every other batch size
called twice, host arrays in and out as the serve path has them.

    python -m bench.first_calls --artifact /var/tmp/kiln-bench/cache-resnet50/<key> [--device cuda]

A compiled library compiles nothing on a new size, but the libraries it calls may: cuDNN picks and
builds an execution plan per convolution shape on first use. Every request in flight waits behind
such a call, so its cost shows up as the serving benchmark's tail.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.hardware import describe


def timed(fn: Callable[[list[np.ndarray]], object], args: list[np.ndarray]) -> float:
    start = time.perf_counter()
    fn(args)
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    from kiln.manifest import BATCH
    from kiln.runtime.loader import load_artifact, warm_sizes, warm_up
    from kiln.runtime.tensors import example_arrays

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="the model's name, for the report")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument(
        "--warm-in-thread",
        action="store_true",
        help="call every size once in another thread first (cuDNN's plans are per thread)",
    )
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    model = load_artifact(a.artifact, a.device)
    warm_up(model, warm_sizes(model, a.max_batch_size).before)  # what kiln-serve warms before ready
    warmed = set(model.warmed)  # by kiln-serve's warm-up, before any thread below
    if a.warm_in_thread:
        sizes = range(1, min(a.max_batch_size, model.batch_max) + 1)
        other = threading.Thread(target=warm_up, args=(model, list(sizes)), kwargs={"again": True})
        other.start()
        other.join()
    rows = []
    for size in range(1, min(a.max_batch_size, model.batch_max) + 1):
        args = example_arrays(model.signature, {BATCH: size}, seed=size)
        first, second = timed(model.fn, args), timed(model.fn, args)
        rows.append({"batch": size, "warmed_by_server": size in warmed, "first_ms": first, "second_ms": second})
        print(f"[first-call] batch {size}: first {first:.1f} ms, second {second:.1f} ms", flush=True)
    extra = [r["first_ms"] - r["second_ms"] for r in rows if not r["warmed_by_server"]]
    hardware = describe(a.device)
    where = "after another thread called every size" if a.warm_in_thread else "as kiln-serve warmed it"
    print(
        f"\n{a.model}: first vs second call per batch size {where}, loader {model.loader.value}; hardware: {hardware}"
    )
    print(
        f"sizes kiln-serve warms: {sorted(warmed)}; "
        f"the others' first calls cost {sum(extra):.0f} ms more than their second in all "
        f"(median {np.median(extra) if extra else 0:.1f} ms, max {max(extra, default=0):.1f} ms per size)"
    )
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "hardware": hardware,
                    "model": a.model,
                    "warm_in_thread": a.warm_in_thread,
                    "loader": model.loader.value,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
