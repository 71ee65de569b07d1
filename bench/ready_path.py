"""Where a lean replica's preload chain spends its time, each step timed in fresh processes.

    python -m bench.ready_path --artifact /var/tmp/kiln-bench/cache-resnet50/<key> --device cuda [--rounds 3]

kiln-serve's critical path on a GPU is the preload thread's chain (kiln.runtime.preload): torch's
libraries, the compiled library, then one call at batch 1. This probe times, in a fresh process
each: (1) loading torch's libraries with eager binding (RTLD_NOW, what ctypes does) and lazy binding
(RTLD_LAZY: functions resolved at their first call); (2) the first batch-1 call and the shared
libraries it loads (cuDNN's engines on a convolution), then (3) the same call with those libraries
loaded beforehand, each timed alone: what loading them earlier could take off the chain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.first_calls import timed
from bench.hardware import describe


def child(mode: str, artifact: Path, device: str, preload: list[str]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    from kiln.runtime import preload as pre

    if mode in ("now", "lazy"):
        flags = {"now": os.RTLD_NOW, "lazy": os.RTLD_LAZY}
        start = time.perf_counter()
        pre.load_torch_libraries(device, 1, binding=flags[mode])
        return {"libraries_ms": (time.perf_counter() - start) * 1e3}
    if device == "cuda":
        pre._cuda_context(pre.bundled_cudart())
    pre.load_torch_libraries(device, 1)
    loaded: dict[str, float] = {}
    for path in preload:  # what the first call loaded in the other process, each timed here
        start = time.perf_counter()
        pre._dlopen_global(Path(path))
        loaded[Path(path).name] = (time.perf_counter() - start) * 1e3
    from kiln.manifest import BATCH, Manifest
    from kiln.runtime.loader import load_lean
    from kiln.runtime.tensors import zero_arrays

    model = load_lean(artifact, Manifest.read(artifact), device, 1)
    args = zero_arrays(model.signature, {BATCH: 1})
    before = set(pre.mapped_libraries())
    times = [timed(model.fn, args) for _ in range(3)]
    new = sorted(set(pre.mapped_libraries()) - before)
    return {"preloaded_ms": loaded, "first_ms": times[0], "next_ms": times[1:], "loaded_by_first_call": new}


def run_child(mode: str, a: argparse.Namespace, preload: list[str]) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parent.parent)  # appended: the repo's operator/ would shadow stdlib's
    run = f"import runpy, sys; sys.path.append({root!r}); runpy.run_module('bench.ready_path', run_name='__main__')"
    cmd = [sys.executable, "-P", "-c", run, "--child", mode, "--artifact", str(a.artifact)]
    cmd += ["--device", a.device, "--preload", json.dumps(preload)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="the model's name, for the report")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", default="")
    p.add_argument("--preload", default="[]")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.artifact, a.device, json.loads(a.preload))))
        return 0
    hardware = describe(a.device)
    binding: dict[str, list[float]] = {"now": [], "lazy": []}
    for _ in range(a.rounds):  # alternated: the host's noise falls on both
        for mode in binding:
            binding[mode].append(run_child(mode, a, [])["libraries_ms"])
    for mode, ms in binding.items():
        print(f"[ready-path] torch's libraries, {mode} binding: {', '.join(f'{m:.0f}' for m in ms)} ms", flush=True)
    cold = [run_child("call", a, []) for _ in range(a.rounds)]
    libs = cold[0]["loaded_by_first_call"]
    warm = [run_child("call", a, libs) for _ in range(a.rounds)]
    print(f"[ready-path] libraries the first batch-1 call loads: {[Path(x).name for x in libs]}")
    firsts = ", ".join(f"{r['first_ms']:.0f}" for r in cold)
    print(f"[ready-path] first call, nothing preloaded: {firsts} ms")
    for r in warm:
        total = sum(r["preloaded_ms"].values())
        each = ", ".join(f"{k} {v:.0f}" for k, v in r["preloaded_ms"].items())
        print(f"[ready-path] those libraries loaded first: {total:.0f} ms ({each}); first call {r['first_ms']:.0f} ms")
    summary = {
        "binding_ms": {m: statistics.median(v) for m, v in binding.items()},
        "first_call_ms": statistics.median(r["first_ms"] for r in cold),
        "preload_ms": statistics.median(sum(r["preloaded_ms"].values()) for r in warm),
        "first_call_after_preload_ms": statistics.median(r["first_ms"] for r in warm),
    }
    print(f"\n{a.model or a.artifact.name[:12]} on {hardware}: {summary}")
    if a.out:
        report = {"hardware": hardware, "model": a.model, "summary": summary, "binding": binding}
        a.out.write_text(json.dumps(report | {"cold": cold, "warm": warm}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
