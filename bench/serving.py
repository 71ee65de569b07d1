"""Serving speed: kiln-serve over HTTP (and gRPC, `--protocols http,grpc`) at several concurrencies,
with and without dynamic batching, against the same compiled model called in-process (the limit).

    python -m bench.serving --model resnet50 --device cuda --artifact /var/tmp/kiln-bench/cache-resnet50/<key>

Each client sends batch-1 requests with binary tensors over keep-alive connections,
from several processes so the client is not the bottleneck. Each server shape is compared
in one run: loaders (`--loaders`) and intake-process counts (`--intakes 0,4,-1`); rows also
give the mean batch the model ran, the p50 of an empty HTTP request (the loopback floor) and where
a request's time went in the server (means of its request, intake, model-process and queue
histograms). Each server is measured once its model thread has called every batch size (the first
seconds after ready are docs/benchmarks.md §11's subject). With gRPC, the same server answers both
protocols and each row names its protocol.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.client import GRPC_INFER, Client, GrpcClient, decode, decode_grpc, encode, encode_grpc, go_load
from bench.coldstart import free_port, matches, serve_command
from bench.hardware import describe

Variant = tuple[bytes, dict[str, str], np.ndarray]  # a request body (or gRPC message), its headers, eager's answer


def _worker(
    port: int,
    model: str,
    body: bytes,
    headers: dict[str, str],
    threads: int,
    first: int,
    seconds: float,
    out: Any,
    path: str | None = None,
    variants: list[Variant] | None = None,
    trim: bool = False,
) -> None:
    import threading

    latencies: list[float] = []
    errors, wrong = [0], [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        grpc = path == "grpc"
        client: Any = GrpcClient("127.0.0.1", port) if grpc else Client("127.0.0.1", port)
        mine, k = [], i
        while time.perf_counter() < deadline:
            sent, sent_headers, expected = variants[k % len(variants)] if variants else (body, headers, None)
            k += 1
            start = time.perf_counter()
            if grpc:
                reply = client.infer(sent)
                status, data, split = (200, reply, None) if reply is not None else (0, b"", None)
            else:
                status, data, split = client.infer(model, sent, sent_headers, path)
            if status == 200:
                mine.append(time.perf_counter() - start)
                got = (decode_grpc(data) if grpc else decode(data, split))[0] if expected is not None else None
                if got is not None and trim:  # a padded request: its answer's leading rows are the real ones
                    got = got[tuple(slice(0, n) for n in expected.shape)]
                if got is not None and not matches(got, expected):
                    wrong[0] += 1  # batching must never hand a request another's answer
            else:
                errors[0] += 1
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=loop, args=(i + first,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((latencies, errors[0], wrong[0]))


def load(
    port: int,
    model: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    path: str | None = None,
    variants: list[Variant] | None = None,
    trim: bool = False,
    client: str = "python",
) -> dict[str, Any]:
    """Batch-1 requests from `concurrency` keep-alive connections for `seconds`; `path` for non-v2 servers
    ("grpc": `port` is kiln-serve's gRPC port and bodies are serialized ModelInferRequests).
    With `variants` (bodies, their headers and eager answers), connection i sends variants i, i+1, … in turn and
    checks every answer (`trim`: against the answer's leading part, for requests padded by the client).
    `client` "go": kiln-loadgen (bench/loadgen), which leaves the CPU to the server on small hosts."""
    if client == "go" and not trim:
        grpc = path == "grpc"
        route = GRPC_INFER if grpc else path or f"/v2/models/{model}/infer"
        protocol = "grpc" if grpc else "http"
        return go_load(port, route, variants or [(body, headers, None)], concurrency, seconds, protocol=protocol)
    procs_n = min(concurrency, max(1, (os.cpu_count() or 2) // 2), 8)
    per = [concurrency // procs_n + (1 if i < concurrency % procs_n else 0) for i in range(procs_n)]
    queue: Any = mp.get_context("fork").Queue()
    procs = [
        mp.get_context("fork").Process(
            target=_worker, args=(port, model, body, headers, n, sum(per[:i]), seconds, queue, path, variants, trim)
        )
        for i, n in enumerate(per)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    lat = np.array([x for r in results for x in r[0]])
    return {
        "concurrency": concurrency,
        "requests": int(lat.size),
        "errors": sum(r[1] for r in results),
        "wrong": sum(r[2] for r in results),
        "rps": lat.size / elapsed,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
    }


def answers(model: str, device: str, n: int, grpc: bool = False) -> list[Variant]:
    """`n` different batch-1 request bodies (gRPC messages) and eager PyTorch's answers to them."""
    import torch

    eager = models.build(model).to(device)
    out = []
    for i in range(n):
        args = [t[:1] for t in models.inputs(model, i + 1)]
        with torch.inference_mode():
            result = eager(*(t.to(device) for t in args))
        first = result[0] if isinstance(result, tuple) else result
        arrays = [t.numpy() for t in args]
        request = (encode_grpc(model, models.names(model), arrays), {}) if grpc else encode(models.names(model), arrays)
        out.append((*request, first.float().cpu().numpy()))
    return out


IDLE_BETWEEN_S = 0.001  # between paced in-process calls: about what a request spends outside the model at c=1


def in_process(
    artifact: Path, device: str, model: str, batches: list[int], seconds: float
) -> dict[int, dict[str, float]]:
    from kiln.runtime.loader import load_artifact

    loaded = load_artifact(artifact, device)  # the loader a pod takes (lean where it can)
    out = {}
    for batch in batches:
        # Host arrays in, host arrays out, as the HTTP path has them: copies to and from the GPU included.
        args = [a.numpy() for a in models.inputs(model, batch)]
        for _ in range(5):
            loaded.fn(args)
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            loaded.fn(args)
            times.append(time.perf_counter() - start)
        t = np.array(times)
        out[batch] = {"rows_per_s": batch / t.mean(), "p50_ms": float(np.percentile(t, 50) * 1e3)}
        if batch == 1:  # as one client at a time calls it: the CPU and GPU idle a moment between calls
            paced = []
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                time.sleep(IDLE_BETWEEN_S)
                start = time.perf_counter()
                loaded.fn(args)
                paced.append(time.perf_counter() - start)
            out[batch]["paced_p50_ms"] = float(np.percentile(paced, 50) * 1e3)
    return out


def serve(
    artifact: Path,
    device: str,
    model: str,
    batching: bool,
    log: Path,
    loader: str = "lean",
    batch_max: int = 64,
    intakes: int = -1,
    grpc_port: int = 0,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    batch = (
        [f"--max-batch-size={batch_max}", "--max-delay-ms=1"]
        if batching
        else ["--max-batch-size=1", "--max-delay-ms=0"]
    )
    cmd = serve_command(
        port,
        model,
        device,
        f"--artifact={artifact}",
        "--max-queue=4096",
        f"--intake-processes={intakes}",
        f"--grpc-port={grpc_port}",
        *batch,
        *extra,
    )
    env = {**os.environ, "KILN_LOADER": loader}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    wait_ready(port, log)
    return proc, port


def wait_ready(port: int, log: Path) -> None:
    """Until kiln-serve on `port` answers ready (TimeoutError after 60 s, with the end of its log)."""
    for _ in range(600):
        try:
            c = Client("127.0.0.1", port, timeout=2)
            c.conn.request("GET", "/v2/health/ready")
            if c.conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(log.read_text()[-2000:])


def intake_processes(port: int, model: str) -> int:
    """How many intake processes the server runs (its model metadata says)."""
    client = Client("127.0.0.1", port)
    client.conn.request("GET", f"/v2/models/{model}")
    return int(json.loads(client.conn.getresponse().read())["parameters"].get("intake_processes", 0))


# Server-side histograms whose means say where a request's time went (ms), by the row key they fill.
PARTS = {
    "server_ms": "kiln_request_duration_seconds",  # the whole request in the server
    "intake_ms": "kiln_intake_seconds",  # an intake encoding the answer from the model process's outputs
    "model_ms": "kiln_model_seconds",  # the model process's part: queue, batch and model call
    "queue_ms": "kiln_queue_seconds",  # a batch's first request, waiting to be gathered
}


def metrics_text(port: int) -> str:
    client = Client("127.0.0.1", port)
    client.conn.request("GET", "/metrics")
    return client.conn.getresponse().read().decode()


def server_totals(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) so far of every histogram (kiln_batch_size and the PARTS ones among them), from /metrics."""
    found: dict[str, list[float]] = {}
    for line in metrics_text(port).splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]  # name{labels} value
        for part, index in (("_sum", 0), ("_count", 1)):
            if name.endswith(part):
                found.setdefault(name.removesuffix(part), [0.0, 0.0])[index] += float(value)
    return {k: (v[0], v[1]) for k, v in found.items()}


def warmed(port: int, timeout: float = 120.0) -> float:
    """Seconds until the model thread has called every batch size once (kiln_model_warm_sizes_left is 0):
    the rows measure a warm server; docs/benchmarks.md §11 measures the first seconds apart."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        gauge = "kiln_model_warm_sizes_left"
        if not any(float(line.rsplit(" ", 1)[1]) for line in metrics_text(port).splitlines() if line.startswith(gauge)):
            break
        time.sleep(0.1)
    return time.perf_counter() - start


def breakdown(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The mean batch and the mean ms of each PARTS histogram between two server_totals readings."""

    def mean(metric: str, scale: float) -> float:
        (s0, n0), (s1, n1) = before.get(metric, (0.0, 0.0)), after.get(metric, (0.0, 0.0))
        return (s1 - s0) / max(1.0, n1 - n0) * scale

    return {"mean_batch": mean("kiln_batch_size", 1.0)} | {key: mean(m, 1e3) for key, m in PARTS.items()}


def empty_round_trip(port: int, seconds: float = 2.0, client_kind: str = "python") -> float:
    """p50 ms of GET /v2/health/live on one keep-alive connection: the loopback HTTP floor of a request
    (measured with the client the rows use)."""
    if client_kind == "go":
        return float(go_load(port, "/v2/health/live", [(b"", {}, None)], 1, seconds, method="GET")["p50_ms"])
    client = Client("127.0.0.1", port)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        client.conn.request("GET", "/v2/health/live")
        client.conn.getresponse().read()
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--loaders", default="lean", help="KILN_LOADER values to compare, e.g. lean,runner")
    p.add_argument(
        "--intakes", default="0,-1", help="--intake-processes values to compare (0: one process; -1: kiln's default)"
    )
    p.add_argument("--batching", default="off,on", help="dynamic batching off, on, or both (off first)")
    p.add_argument("--protocols", default="http", help="http, grpc or both (the same server answers both)")
    p.add_argument(
        "--server-args",
        action="append",
        help="extra kiln-serve arguments of one variant, e.g. '--wait-arriving=false' (repeat to compare; "
        "applied to the batching runs)",
    )
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument(
        "--client",
        default="python",
        choices=("python", "go"),
        help="Python threads, or kiln-loadgen (Go; HTTP and gRPC)",
    )
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    protocols = a.protocols.split(",")
    hardware = describe(a.device)
    conc = [int(c) for c in a.concurrency.split(",")]
    args = models.inputs(a.model, 1)
    body, headers = encode(models.names(a.model), [t.numpy() for t in args])
    variants = {"http": answers(a.model, a.device, 8)}
    if "grpc" in protocols:
        variants["grpc"] = answers(a.model, a.device, 8, grpc=True)
    rows = []
    limits: dict[str, dict[int, dict[str, float]]] = {}
    server_args = a.server_args or [""]
    runs = [
        (loader, intakes, batching, extra)
        for loader, intakes, batching in itertools.product(
            a.loaders.split(","), [int(n) for n in a.intakes.split(",")], [b == "on" for b in a.batching.split(",")]
        )
        for extra in (server_args if batching else [""])
    ]
    for n, (loader, intakes, batching, extra) in enumerate(runs):
        os.environ["KILN_LOADER"] = loader  # in-process too: the same loader as the server's
        if loader not in limits:
            batches = sorted({1, *[min(c, 64) for c in conc]})
            limits[loader] = in_process(a.artifact, a.device, a.model, batches, a.seconds / 2)
        limit = limits[loader]
        log = Path(f"/tmp/serve-{n}-{loader}-{intakes}-{int(batching)}.log")
        grpc_port = free_port() if "grpc" in protocols else 0
        proc, port = serve(
            a.artifact,
            a.device,
            a.model,
            batching,
            log,
            loader,
            intakes=intakes,
            grpc_port=grpc_port,
            extra=tuple(extra.split()),
        )
        try:
            load(port, a.model, body, headers, 4, 1.0)  # warm connections and caches
            print(f"[serving] every batch size warmed in the model thread {warmed(port):.1f} s later", flush=True)
            floor = empty_round_trip(port, client_kind=a.client)
            processes = intake_processes(port, a.model)
            for protocol, c in itertools.product(protocols, conc):
                before = server_totals(port)
                if protocol == "grpc":
                    r = load(grpc_port, a.model, b"", {}, c, a.seconds, "grpc", variants["grpc"], client=a.client)
                else:
                    r = load(port, a.model, body, headers, c, a.seconds, variants=variants["http"], client=a.client)
                r |= breakdown(before, server_totals(port))
                base = limit[min(c, 64) if batching else 1]
                r |= {
                    "protocol": protocol,
                    "batching": batching,
                    "loader": loader,
                    "intake_processes": processes,
                    "server_args": extra,
                    "empty_p50_ms": floor,
                    "inproc_rows_per_s": base["rows_per_s"],
                    "ratio": r["rps"] / base["rows_per_s"],
                    "inproc_p50_ms": limit[1]["p50_ms"],
                    "inproc_paced_p50_ms": limit[1]["paced_p50_ms"],
                }
                rows.append(r)
                print(
                    f"[serving] {protocol} {loader} intakes={processes} batching={batching} {extra} c={c}: "
                    f"{r['rps']:.0f} req/s "
                    f"p50 {r['p50_ms']:.2f} ms (empty request {floor:.2f} ms, mean batch {r['mean_batch']:.1f}) "
                    f"p99 {r['p99_ms']:.2f} ms ({r['ratio']:.0%} of in-process); server means: request "
                    f"{r['server_ms']:.2f} ms, intake {r['intake_ms']:.2f}, model process {r['model_ms']:.2f}, "
                    f"queue {r['queue_ms']:.2f}",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    over = " and ".join(protocols)
    print(f"\nServing {a.model} over {over} vs in-process; {a.client} client; hardware: {hardware}\n")
    print(
        "| protocol | loader | intake processes | batching | server args | concurrency | req/s | mean batch "
        "| p50 ms | p99 ms | in-process rows/s (same batch) | served / in-process | in-process p50 ms (batch 1) "
        "| same, 1 ms idle between calls "
        "| empty HTTP request p50 ms | errors | wrong answers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['protocol']} | {r['loader']} | {r['intake_processes']} | {'on' if r['batching'] else 'off'} "
            f"| {r['server_args'] or '—'} "
            f"| {r['concurrency']} "
            f"| {r['rps']:.0f} | {r['mean_batch']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['inproc_rows_per_s']:.0f} | {r['ratio']:.0%} | {r['inproc_p50_ms']:.2f} "
            f"| {r['inproc_paced_p50_ms']:.2f} | {r['empty_p50_ms']:.3f} "
            f"| {r['errors']} | {r['wrong']} |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps(
                {
                    "hardware": hardware,
                    "model": a.model,
                    "client": a.client,
                    "rows": rows,
                    "in_process": {loader: {str(k): v for k, v in lim.items()} for loader, lim in limits.items()},
                },
                indent=2,
            )
        )
    return 1 if any(r["wrong"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
