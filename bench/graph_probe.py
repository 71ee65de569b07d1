"""How much of a compiled model's GPU call is launch overhead: the AOTInductor package called as it is
served now against the same call captured once and replayed as a CUDA graph, per batch size.

    python -m bench.graph_probe --model resnet50 --artifact /var/tmp/kiln-bench/cache-resnet50/<key>

GPU-resident inputs and outputs (no host copies): what is compared is the model call alone. `enqueue`
is the CPU time of one call before it returns (kernel launches), `call` the time to its results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import models
from bench.hardware import describe


def p50_ms(fn: Callable[[], object], sync: Callable[[], None], seconds: float) -> tuple[float, float]:
    """(enqueue p50, call-to-results p50) in ms."""
    for _ in range(5):
        fn()
        sync()
    enqueue, total = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        enqueue.append(time.perf_counter() - start)
        sync()
        total.append(time.perf_counter() - start)
    return float(np.percentile(enqueue, 50) * 1e3), float(np.percentile(total, 50) * 1e3)


def main() -> int:
    import torch
    from torch.utils._pytree import tree_leaves

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--batches", default="1,8,16,24,32,64")
    p.add_argument("--seconds", type=float, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    compiled = torch._inductor.aoti_load_package(str(a.artifact / "model.pt2"))
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        inputs = [t.cuda() for t in models.inputs(a.model, batch)]
        direct_out = next(iter(tree_leaves(compiled(*inputs)))).clone()
        direct = p50_ms(lambda: compiled(*inputs), torch.cuda.synchronize, a.seconds)  # noqa: B023
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                compiled(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "relaxed": under the default "global" mode the H200 invalidated the capture
        # (cudaErrorStreamCaptureInvalidated): the AOTInductor runtime makes a call that mode forbids
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            captured = list(tree_leaves(compiled(*inputs)))
        graph.replay()
        torch.cuda.synchronize()
        same = bool(torch.allclose(captured[0], direct_out, rtol=1e-3, atol=1e-3))
        replay = p50_ms(graph.replay, torch.cuda.synchronize, a.seconds)
        row = {
            "batch": batch,
            "direct_enqueue_ms": direct[0],
            "direct_ms": direct[1],
            "graph_enqueue_ms": replay[0],
            "graph_ms": replay[1],
            "same_answer": same,
        }
        rows.append(row)
        print(
            f"[graph] batch {batch}: direct {direct[1]:.2f} ms (enqueue {direct[0]:.2f}), "
            f"graph {replay[1]:.2f} ms (enqueue {replay[0]:.3f}), same answer {same}",
            flush=True,
        )
        del graph, captured
    hardware = describe("cuda")
    print(f"\n{a.model}: AOTInductor call vs its CUDA graph replay (GPU-resident tensors); hardware: {hardware}\n")
    print(
        "| batch | call p50 ms (CPU enqueue) | graph replay p50 ms (CPU enqueue) | rows/s call | rows/s graph "
        "| ratio | same answer |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["batch"]
        print(
            f"| {b} | {r['direct_ms']:.2f} ({r['direct_enqueue_ms']:.2f}) "
            f"| {r['graph_ms']:.2f} ({r['graph_enqueue_ms']:.3f}) "
            f"| {b / r['direct_ms'] * 1e3:.0f} | {b / r['graph_ms'] * 1e3:.0f} "
            f"| {r['direct_ms'] / r['graph_ms']:.2f}x | {r['same_answer']} |"
        )
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware, "model": a.model, "rows": rows}, indent=2))
    return 0 if all(r["same_answer"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
