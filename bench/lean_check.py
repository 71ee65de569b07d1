"""Check the lean loader on a device end to end: compile the variable-length encoder, serve it, compare with eager.

    python -m bench.lean_check --device cuda

For machines CI never sees (the lent GPU): kiln-compile validates through the loader
pods use, then a fresh kiln-serve answers at several batch sizes and sequence lengths,
each answer compared with eager PyTorch, and reports its loader, whether it imported
torch, and its ready time. Exits 1 on any wrong answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.coldstart import free_port, serve_command
from examples import models


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-lean-"))
    archive = models.export("encoder", work / "encoder.pt2")
    term = work / "term"
    start = time.perf_counter()
    compiled = subprocess.run(
        [sys.executable, "-P", "-m", "kiln.runtime.compile", f"--uri=file://{archive}", f"--cache={work / 'cache'}",
         f"--device={a.device}", "--batch-max=8", f"--termination-log={term}"],
        capture_output=True, text=True,
    )  # fmt: skip
    print(compiled.stdout[-3000:], compiled.stderr[-3000:], sep="\n", flush=True)
    if compiled.returncode != 0:
        return 1
    path = json.loads(term.read_text())["path"]
    print(f"[lean-check] compiled in {time.perf_counter() - start:.1f} s: {path}", flush=True)
    port = free_port()
    log = work / "serve.log"
    start = time.perf_counter()
    server = subprocess.Popen(
        serve_command(port, "model", a.device, f"--artifact={path}"), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    wrong = 0
    try:
        while True:
            if server.poll() is not None:
                print(log.read_text())
                return 1
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        ready = time.perf_counter() - start
        params = client.get("/v2/models/model").json()["parameters"]
        print(f"[lean-check] ready in {ready:.2f} s; loader {params['loader']}, torch imported: "
              f"{params['torch_imported']}, fallback: {params.get('loader_fallback')}", flush=True)  # fmt: skip
        for batch, length in [(1, 2), (3, 9), (8, 33), (2, 64)]:
            ids, mask = models.examples("encoder", batch, seed=length, length=length)
            body = {"inputs": [
                {"name": n, "shape": list(t.shape), "datatype": "INT64", "data": t.flatten().tolist()}
                for n, t in (("ids", ids), ("mask", mask))
            ]}  # fmt: skip
            out = client.post("/v2/models/model/infer", json=body).json()["outputs"]
            want = models.eager("encoder", ids, mask)
            for o, w in zip(out, want, strict=True):
                error = float(np.abs(np.asarray(o["data"]).reshape(o["shape"]) - w.numpy()).max())
                ok = error <= 1e-3 + 1e-2 * float(w.abs().max())
                wrong += not ok
                verdict = "ok" if ok else "WRONG"
                print(f"[lean-check] batch {batch} seq {length} {o['name']}: max error {error:.2e} {verdict}")
    finally:
        server.kill()
        print(log.read_text()[-2000:])
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
