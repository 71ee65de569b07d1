"""Peers on this CPU: kiln-serve, TorchServe and BentoML serving the same model, same machine, one run.

    bash bench/peers/setup.sh                      # once: TorchServe and BentoML in their own venv
    bash bench/run.sh peers --models mlp,resnet50 --out docs/results/peers-cpu.json

For each server: ready time (process start → first correct answer; Kiln's compile Job is
reported apart, it runs once per key, not per replica), then batch-1 requests from 8 and 64
keep-alive connections: throughput, p50 and p99. Every server gets one model process with
dynamic batching up to 32 rows and a 2 ms window, and eager PyTorch where it has no compiler.
Bodies: Kiln's binary tensor extension and TorchServe's raw body carry float32 bytes; BentoML's
numpy API takes JSON, so Kiln is also measured with JSON bodies for the like-for-like ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.client import Client, decode, encode
from bench.coldstart import compile_artifact, free_port, kill_tree, serve_command, time_to_answer
from bench.hardware import describe
from bench.serving import load

REPO = Path(__file__).resolve().parents[2]
PEERS = Path(os.environ.get("KILN_PEERS_VENV", Path.home() / ".cache/kiln/peers"))
CONCURRENCY = [8, 64]
BATCH, DELAY_MS = 32, 2


def row_shapes(name: str) -> list[list[int]]:
    return [list(t.shape[1:]) for t in models.inputs(name, 1)]


def raw_row(name: str) -> bytes:
    return b"".join(t.numpy().astype(np.float32).tobytes() for t in models.inputs(name, 1))


def peer_env(name: str, work: Path) -> dict[str, str]:
    # Only bench/ and examples/ on the path: the peers' own environments, nothing else of the repo.
    path = work / "pythonpath"
    path.mkdir(exist_ok=True)
    for package in ("bench", "examples"):
        if not (path / package).exists():
            (path / package).symlink_to(REPO / package)
    return {
        **os.environ,
        "PATH": f"{PEERS / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": str(path),
        "LOG_LOCATION": str(work / "torchserve-logs"),  # TorchServe writes ./logs otherwise
        "METRICS_LOCATION": str(work / "torchserve-logs"),
        "KILN_PEER_SPEC": json.dumps({"model": name, "shapes": row_shapes(name)}),
    }


def run_server(
    label: str,
    cmd: list[str],
    env: dict[str, str],
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    parse: Any,
    expected: np.ndarray,
    work: Path,
    seconds: float,
) -> dict[str, Any]:
    def ask() -> np.ndarray | None:
        client = Client("127.0.0.1", port, timeout=120)
        status, data, head = client.infer("", body, headers, path)
        client.close()
        return parse(data, head) if status == 200 else None

    print(f"[peers] {label}: ready time ...", flush=True)
    ready = time_to_answer(cmd, env, ask, expected, 600, work / f"{label}-ready.log")
    print(f"[peers] {label}: ready in {ready:.2f} s; load ...", flush=True)
    log = (work / f"{label}-serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if ask() is not None:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not come up: {(work / f'{label}-serve.log').read_text()[-1500:]}")
            time.sleep(0.1)
        load(port, "", body, headers, 4, 2.0, path)  # warm-up
        runs = [load(port, "", body, headers, c, seconds, path) for c in CONCURRENCY]
    finally:
        kill_tree(proc.pid)
        proc.wait()
    for r in runs:
        print(f"[peers] {label} c={r['concurrency']}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.1f} ms", flush=True)
    return {"ready_s": round(ready, 2), "load": runs}


def torchserve(name: str, work: Path) -> tuple[list[str], int]:
    store = work / f"ts-store-{name}"
    store.mkdir(exist_ok=True)
    subprocess.run(
        [
            str(PEERS / "bin/torch-model-archiver"),
            "--model-name",
            name,
            "--version",
            "1.0",
            "--handler",
            str(REPO / "bench/peers/torchserve_handler.py"),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
    )
    port, mport, metrics = free_port(), free_port(), free_port()
    model = {
        "1.0": {
            "defaultVersion": True,
            "marName": f"{name}.mar",
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": BATCH,
            "maxBatchDelay": DELAY_MS,
            "responseTimeout": 300,
        }
    }
    config = work / f"ts-{name}.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{mport}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\nmodel_store={store}\nload_models={name}.mar\n"
        f"models={json.dumps({name: model})}\ndisable_token_authorization=true\n"
        "default_workers_per_model=1\ninstall_py_dep_per_model=false\n"
    )
    cmd = [
        str(PEERS / "bin/torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        "--model-store",
        str(store),
        "--ts-config",
        str(config),
        "--disable-token-auth",
    ]
    return cmd, port


def run_model(name: str, work: Path, seconds: float) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        out = models.build(name)(*models.inputs(name, 1))
    expected = (out[0] if isinstance(out, tuple) else out).numpy().reshape(1, -1)
    archive = models.export(name, work / f"{name}.pt2", BATCH)
    print(f"[peers] {name}: kiln compile job ...", flush=True)
    artifact = compile_artifact(name, archive, work / "cache", "cpu", BATCH)
    results: dict[str, Any] = {"compile_job_s": artifact["job_seconds"]}
    batching = [f"--max-batch-size={BATCH}", f"--max-delay-ms={DELAY_MS}", "--max-queue=4096"]
    arrays = [t.numpy() for t in models.inputs(name, 1)]
    binary, bin_headers = encode(models.names(name), arrays)
    as_json = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "FP32", "data": a.flatten().tolist()}
                for n, a in zip(models.names(name), arrays, strict=True)
            ]
        }
    ).encode()
    kiln_path = f"/v2/models/{name}/infer"

    def kiln_parse(data: bytes, head: str | None) -> np.ndarray:
        return decode(data, head)[0].reshape(1, -1)

    port = free_port()
    kiln_cmd = serve_command(port, name, "cpu", f"--artifact={artifact['path']}", *batching)
    env = dict(os.environ)
    results["kiln (binary)"] = run_server(
        "kiln-binary", kiln_cmd, env, port, kiln_path, binary, bin_headers, kiln_parse, expected, work, seconds
    )
    json_headers = {"Content-Type": "application/json"}
    results["kiln (JSON)"] = run_server(
        "kiln-json", kiln_cmd, env, port, kiln_path, as_json, json_headers, kiln_parse, expected, work, seconds
    )
    ts_cmd, ts_port = torchserve(name, work)
    results["TorchServe (raw bytes)"] = run_server(
        "torchserve",
        ts_cmd,
        peer_env(name, work),
        ts_port,
        f"/predictions/{name}",
        raw_row(name),
        {"Content-Type": "application/octet-stream"},
        lambda data, _: np.frombuffer(data, dtype=np.float32).reshape(1, -1),
        expected,
        work,
        seconds,
    )
    bento_port = free_port()
    bento_cmd = [
        str(PEERS / "bin/bentoml"),
        "serve",
        "bench.peers.bento_service:Peer",
        "--host",
        "127.0.0.1",
        "--port",
        str(bento_port),
        "--working-dir",
        str(work / "pythonpath"),
    ]
    row = np.frombuffer(raw_row(name), dtype=np.float32)
    results["BentoML (JSON)"] = run_server(
        "bentoml",
        bento_cmd,
        peer_env(name, work),
        bento_port,
        "/predict",
        json.dumps({"x": [row.tolist()]}).encode(),
        {"Content-Type": "application/json"},
        lambda data, _: np.asarray(json.loads(data), dtype=np.float32).reshape(1, -1),
        expected,
        work,
        seconds,
    )
    return results


def table(name: str, results: dict[str, Any]) -> str:
    kiln = results["kiln (binary)"]
    lines = [
        f"### {name} (kiln compile job, once per key: {results['compile_job_s']} s)",
        "",
        "| server | ready s | c=8 req/s | p50 ms | p99 ms | c=64 req/s | p50 ms | p99 ms | kiln/this c=8 | c=64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        if not isinstance(r, dict):
            continue
        c8, c64 = r["load"]
        k8, k64 = kiln["load"]
        lines.append(
            f"| {label} | {r['ready_s']} | {c8['rps']:.1f} | {c8['p50_ms']:.1f} | {c8['p99_ms']:.1f} | "
            f"{c64['rps']:.1f} | {c64['p50_ms']:.1f} | {c64['p99_ms']:.1f} | "
            f"{k8['rps'] / c8['rps']:.2f}x | {k64['rps'] / c64['rps']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,resnet50")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (PEERS / "bin/torchserve").exists():
        print(f"no TorchServe/BentoML venv at {PEERS}: run bash bench/peers/setup.sh first", file=sys.stderr)
        return 2
    versions = subprocess.run(
        [str(PEERS / "bin/python"), "-c", "import bentoml, ts, torch; print(ts.__version__, bentoml.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.split()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-peers-", dir="/var/tmp"))
    hardware = describe("cpu")
    report: dict[str, Any] = {"hardware": hardware, "torchserve": versions[0], "bentoml": versions[1], "models": {}}
    for name in args.models.split(","):
        report["models"][name] = run_model(name, work, args.seconds)
    print(f"\nhardware: {json.dumps(hardware)}; TorchServe {versions[0]}, BentoML {versions[1]}")
    for name, results in report["models"].items():
        print("\n" + table(name, results))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
