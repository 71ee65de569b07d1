"""Replica cold start: process start → first correct HTTP answer, for eager, torch.compile and Kiln AOT.

    python -m bench.coldstart --models mlp,resnet50,bert --device cuda --out docs/results/coldstart-cuda.json

Each mode starts `kiln-serve` in a fresh process and polls /infer until the answer
matches eager PyTorch: eager; jit with an empty inductor cache; jit with the
cache the previous run left (warm); aot through torch's stock `aoti_load_package`;
aot through torch's runner (`KILN_LOADER=runner`, imports torch); aot through Kiln's
lean loader (the default: the C shim, no torch import). Also reports the one-time
compile job, and where the lean replica's import time goes (`-X importtime`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.client import Client, decode, encode
from bench.hardware import describe

MODES = ["eager", "jit-cold", "jit-warm", "aot-package", "aot-runner", "aot-single", "aot"]
LOADERS = {"aot-package": "package", "aot-runner": "runner", "aot-single": "lean", "aot": "lean"}
# aot-single: the lean replica as one process (--intake-processes=0); aot: with its intake processes (the default)
MODE_ENV = {"aot-single": {"KILN_INTAKE_PROCESSES": "0"}}
LOG_WORDS = ("loaded", "warmed up", "ready in", "Started server", "lean loader", "start-up")  # server log lines shown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(port: int, model: str, device: str, *extra: str) -> list[str]:
    """kiln-serve on loopback, as a benchmark starts it."""
    return [
        sys.executable,
        "-P",
        "-m",
        "kiln.runtime.serve",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--model-name={model}",
        f"--device={device}",
        *extra,
    ]


def compile_artifact(name: str, archive: Path, cache: Path, device: str, batch_max: int, *extra: str) -> dict[str, Any]:
    term = cache.parent / f"{name}.term"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kiln.runtime.compile",
            f"--uri=file://{archive}",
            f"--cache={cache}",
            f"--device={device}",
            f"--batch-max={batch_max}",
            f"--termination-log={term}",
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"compile of {name} failed: {proc.stderr[-2000:]}")
    summary = json.loads(term.read_text())
    return {
        "key": summary["key"],
        "path": summary["path"],
        "job_seconds": round(wall, 1),
        "aoti_seconds": summary["compileSeconds"],
        "package_bytes": summary["sizeBytes"],
    }


def ready_seconds(
    cmd: list[str],
    env: dict[str, str],
    port: int,
    model: str,
    body: bytes,
    headers: dict[str, str],
    expected: np.ndarray,
    timeout: float,
    log: Path,
) -> float:
    """Process start → first correct answer of kiln-serve over the v2 protocol."""

    def ask() -> np.ndarray | None:
        client = Client("127.0.0.1", port, timeout=timeout)
        status, data, head = client.infer(model, body, headers)
        client.close()
        return decode(data, head)[0] if status == 200 else None

    return time_to_answer(cmd, env, ask, expected, timeout, log)


def logged_ready(log: Path) -> float | None:
    """When kiln-serve logged `ready in` (its model loaded, warmed and batching), as time.time()."""
    for line in log.read_text().splitlines():
        if "kiln.serve: ready in" in line:
            stamp = line[:23]  # logging's asctime: 2026-12-04 12:40:09,831
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def matches(got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether `got` is eager PyTorch's answer, within what compiled kernels may differ by."""
    error = float(np.abs(got.reshape(expected.shape) - expected).max())
    return error <= 1e-3 + 2e-2 * float(np.abs(expected).max())


def time_to_answer(
    cmd: list[str],
    env: dict[str, str],
    ask: Callable[[], np.ndarray | None],
    expected: np.ndarray,
    timeout: float,
    log: Path,
) -> float:
    """Start `cmd`, call `ask` until it returns an answer (None or OSError: not yet), check it, kill the server."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-1500:]}")
            try:
                got = ask()
            except OSError:
                got = None
            if got is not None:
                if not matches(got, expected):
                    raise RuntimeError(f"wrong answer: {got.ravel()[:5]}, expected {expected.ravel()[:5]}")
                return time.perf_counter() - start
            time.sleep(0.02)
        raise TimeoutError(f"not ready after {timeout} s")
    finally:
        kill_tree(proc.pid)
        proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a server, its process group and every process under it: peers start worker processes of
    their own, and BentoML's leave the group (left running, they held 1.5 GB each and took CPU)."""
    found, i = [pid], 0
    while i < len(found):  # collected before any is killed: an orphan's parent becomes init
        for task in Path(f"/proc/{found[i]}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                found += [int(child) for child in (task / "children").read_text().split()]
        i += 1
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for each in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def run_model(
    name: str, device: str, work: Path, batch_max: int, timeout: float, modes: list[str], rounds: int = 1
) -> dict[str, Any]:
    import torch

    archive = models.export(name, work / f"{name}.pt2", batch_max)
    print(f"[coldstart] {name}: exported; compiling once ...", flush=True)
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)  # the compile job's time is a real compile, never a cache hit
    artifact = compile_artifact(name, archive, cache, device, batch_max)
    print(f"[coldstart] {name}: compile job {artifact['job_seconds']} s", flush=True)
    args = models.inputs(name, 1)
    with torch.inference_mode():
        expected = models.build(name).to(device)(*(a.to(device) for a in args))
    first = expected[0] if isinstance(expected, tuple) else expected
    body, headers = encode(models.names(name), [a.numpy() for a in args])
    # Every mode starts with torch's libraries in the page cache, as on a node that ran one pod before.
    subprocess.run([sys.executable, "-P", "-c", f"import torch; torch.zeros(1, device='{device}')"], check=True)
    inductor = work / f"inductor-{name}"
    results: dict[str, Any] = {"compile": artifact, "runs": {m: [] for m in modes}}
    for mode in [m for _ in range(rounds) for m in modes]:  # rounds alternate the modes: host noise falls on each
        if mode == "jit-cold":
            shutil.rmtree(inductor, ignore_errors=True)
        port = free_port()
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
        cmd = serve_command(port, name, device, f"--max-batch-size={batch_max}")
        if mode.startswith("aot"):
            cmd.append(f"--artifact={artifact['path']}")
            env["KILN_LOADER"] = LOADERS[mode]
            env |= MODE_ENV.get(mode, {})
        else:
            cmd += [f"--mode={mode.split('-')[0]}", f"--archive=file://{archive}"]
        log = work / f"{name}-{mode}.log"
        spawned = time.time()
        seconds = ready_seconds(cmd, env, port, name, body, headers, first.float().cpu().numpy(), timeout, log)
        results["runs"][mode].append(round(seconds, 2))
        results[mode] = round(statistics.median(results["runs"][mode]), 2)
        split = ""
        if (logged := logged_ready(log)) is not None:  # kiln-serve: where its own start ends and the answer begins
            ready_at = logged - spawned
            results.setdefault("server_ready", {}).setdefault(mode, []).append(round(ready_at, 3))
            split = f" (server ready at {ready_at:.2f} s, its first answer {seconds - ready_at:.2f} s later)"
        print(f"[coldstart] {name} {mode}: ready in {seconds:.2f} s{split}", flush=True)
        for line in log.read_text().splitlines():
            if any(word in line for word in LOG_WORDS):
                print(f"[coldstart]     {line}", flush=True)
    if "aot" in modes:
        cmd = serve_command(
            free_port(), name, device, f"--max-batch-size={batch_max}", f"--artifact={artifact['path']}"
        )
        results["imports"] = import_breakdown(cmd, work / f"{name}-importtime.log")
        print(f"[coldstart] {name} aot imports before ready: {results['imports']}", flush=True)
    return results


def import_breakdown(cmd: list[str], log: Path, top: int = 8) -> dict[str, float]:
    """Milliseconds of imports per top-level package in a lean replica, start to ready (`-X importtime`):
    each module's own time (not its imports'), summed by package."""
    port = int(next(a for a in cmd if a.startswith("--port=")).split("=")[1])
    with log.open("w") as out:
        proc = subprocess.Popen([cmd[0], "-X", "importtime", *cmd[1:]], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                client = Client("127.0.0.1", port, timeout=2)
                client.conn.request("GET", "/v2/health/ready")
                if client.conn.getresponse().status == 200:
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    totals: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, module = line.removeprefix("import time:").split("|")
        if not own.strip().isdigit():
            continue  # the header line
        package = module.strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(own) / 1000
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"total": round(sum(totals.values()), 1), **{k: round(v, 1) for k, v in ranked[:top]}}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | eager | torch.compile cold | torch.compile warm | AOT, aoti_load_package | AOT, torch runner "
        "| AOT, lean, one process | **AOT, Kiln lean** | lean vs eager | lean vs compile cold | lean vs torch runner "
        "| compile job (once) | package |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        secs = {m: f"{r[m]:.2f} s" if m in r else "—" for m in MODES}
        faster = {m: f"{r[m] / r['aot']:.1f}x faster" if m in r and "aot" in r else "—" for m in MODES}
        size = r["compile"]["package_bytes"] / 1e6
        lines.append(
            f"| {name} | {secs['eager']} | {secs['jit-cold']} | {secs['jit-warm']} | {secs['aot-package']} "
            f"| {secs['aot-runner']} | {secs['aot-single']} | **{secs['aot']}** | {faster['eager']} "
            f"| {faster['jit-cold']} | {faster['aot-runner']} | {r['compile']['job_seconds']} s | {size:.1f} MB |"
        )
    for name, r in results.items():
        if "imports" in r:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in r["imports"].items() if k != "total")
            lines.append(f"\n{name}, lean replica: {r['imports']['total']:.0f} ms of imports before ready ({parts})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-max", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/var/tmp/kiln-bench"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternated; the table shows medians")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    hardware = describe(a.device)
    print(f"[coldstart] hardware: {hardware}", flush=True)
    modes = a.modes.split(",")
    results: dict[str, Any] = {}
    for name in a.models.split(","):
        results[name] = run_model(name, a.device, a.work, a.batch_max, a.timeout, modes, a.rounds)
        if a.out:  # after each model: a run cut short keeps what it measured
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"hardware": hardware, "results": results}, indent=2))
    print("\nReplica cold start (process start → first correct answer over HTTP)")
    print(f"hardware: {hardware}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
