"""CPU backends side by side: OpenVINO IR vs the AOTInductor library, same model, same machine, one run.

    bash bench/run.sh backends --models mlp,resnet50 --out docs/results/backends-cpu.json

For each backend: the compile job (once), the replica's ready time (process start →
first correct HTTP answer), in-process latency at batch 1 and 8, and HTTP throughput
with dynamic batching at concurrency 8.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import models
from bench.client import encode
from bench.coldstart import compile_artifact, free_port, ready_seconds, serve_command
from bench.hardware import describe
from bench.serving import in_process, load, serve

BACKENDS = {"aotinductor": [], "openvino": ["--backend=openvino"]}


def run_backend(name: str, backend: str, archive: Path, work: Path, seconds: float) -> dict[str, Any]:
    import torch

    print(f"[backends] {name}/{backend}: compiling once ...", flush=True)
    artifact = compile_artifact(f"{name}-{backend}", archive, work / "cache", "cpu", 32, *BACKENDS[backend])
    folder = Path(artifact["path"])
    args = models.inputs(name, 1)
    with torch.inference_mode():
        expected = models.build(name)(*args)
    first = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    body, headers = encode(models.names(name), [a.numpy() for a in args])
    port = free_port()
    ready = ready_seconds(
        serve_command(port, name, "cpu", f"--artifact={folder}"),
        dict(os.environ),
        port,
        name,
        body,
        headers,
        first,
        300,
        work / f"ready-{name}-{backend}.log",
    )
    limit = in_process(folder, "cpu", name, [1, 8], seconds / 2)
    proc, port = serve(folder, "cpu", name, True, work / f"serve-{name}-{backend}.log")
    try:
        load(port, name, body, headers, 2, 1.0)
        http = load(port, name, body, headers, 8, seconds)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    row = {
        "model": name,
        "backend": backend,
        "job_seconds": artifact["job_seconds"],
        "compile_seconds": artifact["aoti_seconds"],
        "artifact_bytes": artifact["package_bytes"],
        "ready_s": round(ready, 2),
        "p50_ms_b1": limit[1]["p50_ms"],
        "rows_per_s_b8": limit[8]["rows_per_s"],
        "http_rps_c8": http["rps"],
        "http_p50_ms_c8": http["p50_ms"],
        "http_errors": http["errors"],
    }
    print(f"[backends] {row}", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,resnet50")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    hardware = describe("cpu")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-backends-", dir="/var/tmp"))
    rows = []
    for name in a.models.split(","):
        archive = models.export(name, work / f"{name}.pt2", 32)
        rows += [run_backend(name, backend, archive, work, a.seconds) for backend in BACKENDS]
    print(f"\nOpenVINO vs AOTInductor on CPU; hardware: {hardware}\n")
    print(
        "| model | backend | compile job (once) | artifact | ready | in-process p50, batch 1 "
        "| in-process rows/s, batch 8 | HTTP req/s, c=8 | HTTP p50, c=8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['backend']} | {r['job_seconds']:.1f} s | {r['artifact_bytes'] / 1e6:.1f} MB "
            f"| {r['ready_s']:.2f} s | {r['p50_ms_b1']:.3f} ms | {r['rows_per_s_b8']:.0f} | {r['http_rps_c8']:.0f} "
            f"| {r['http_p50_ms_c8']:.2f} ms |"
        )
    for name in a.models.split(","):
        by = {r["backend"]: r for r in rows if r["model"] == name}
        ov, ai = by["openvino"], by["aotinductor"]
        print(
            f"{name}: OpenVINO / AOTInductor — batch-1 latency {ov['p50_ms_b1'] / ai['p50_ms_b1']:.2f}x, "
            f"batch-8 throughput {ov['rows_per_s_b8'] / ai['rows_per_s_b8']:.2f}x, "
            f"HTTP c=8 {ov['http_rps_c8'] / ai['http_rps_c8']:.2f}x, ready {ov['ready_s'] / ai['ready_s']:.2f}x, "
            f"compile {ov['job_seconds'] / ai['job_seconds']:.2f}x"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
