"""Variable-length serving: BERT-base compiled with a dynamic sequence length against a fixed-length artifact.

    python -m bench.seqlen --device cuda --concurrency 1,64 --out docs/results/seqlen-cuda.json

The same mixed workload (batch-1 requests, real lengths drawn uniformly from 16..512)
goes to three kiln-serve replicas, batching on:
- `dynamic`: the artifact compiled with sequence 16..512 (issue 16), each request at its length;
- `dynamic, bucket 64`: the same artifact, the client pads each request to a multiple of 64
  (attention mask 0 on padding), so more requests share a shape and batch together;
- `fixed 512`: an artifact compiled at sequence 512 only, every request padded to 512 — what a
  user had to do before dynamic dimensions.
Every answer is checked against eager PyTorch on the unpadded request (the real tokens' rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import models
from bench.client import encode
from bench.coldstart import compile_artifact
from bench.hardware import describe
from bench.serving import Variant, load, serve

SEQ_MIN, SEQ_MAX = 16, 512


def lengths(n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(SEQ_MIN, SEQ_MAX + 1, n)]


def padded(args: list[np.ndarray], to: int) -> list[np.ndarray]:
    """input_ids and attention_mask padded with zeros to `to` tokens (the mask keeps padding out of attention)."""
    return [np.pad(a, ((0, 0), (0, to - a.shape[1]))) for a in args]


def workload(device: str, seqs: list[int], pad: Any) -> list[Variant]:
    """A request body per length (padded as `pad(length)` says) and eager PyTorch's answer for the real tokens."""
    import torch

    eager = models.build("bert").to(device)
    out = []
    for n in seqs:
        args = [t.numpy() for t in models.inputs("bert", 1, seq=n)]
        with torch.inference_mode():
            hidden = eager(*(torch.from_numpy(a).to(device) for a in args))[0]
        out.append((*encode(models.names("bert"), padded(args, pad(n))), hidden.float().cpu().numpy()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--batch-max", type=int, default=16)
    p.add_argument("--requests", type=int, default=24, help="distinct request lengths in the workload")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--work", type=Path, default=Path("/var/tmp/kiln-bench"))
    p.add_argument("--reuse", action="store_true", help="keep artifacts an earlier run compiled (a cache hit)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    hardware = describe(a.device)
    a.work.mkdir(parents=True, exist_ok=True)
    seqs = lengths(a.requests)
    artifacts = {}
    for name, seq in (("dynamic", (SEQ_MIN, SEQ_MAX)), ("fixed", SEQ_MAX)):
        archive = models.export("bert", a.work / f"bert-{name}.pt2", a.batch_max, seq)
        cache = a.work / f"cache-bert-{name}"
        if not a.reuse:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"[seqlen] compiling bert {name} ...", flush=True)
        artifacts[name] = compile_artifact(f"bert-{name}", archive, cache, a.device, a.batch_max)
        print(f"[seqlen] bert {name}: compile job {artifacts[name]['job_seconds']} s", flush=True)
    setups = [
        ("dynamic", "dynamic", lambda n: n),
        ("dynamic, bucket 64", "dynamic", lambda n: -(-n // 64) * 64),
        ("fixed 512", "fixed", lambda n: SEQ_MAX),
    ]
    rows = []
    mean_len = float(np.mean(seqs))
    for label, which, pad in setups:
        variants = workload(a.device, seqs, pad)
        log = a.work / f"seqlen-{which}.log"
        proc, port = serve(Path(artifacts[which]["path"]), a.device, "bert", True, log, batch_max=a.batch_max)
        try:
            load(port, "bert", b"", {}, 2, 2.0, variants=variants, trim=True)  # warm kernels
            for c in (int(x) for x in a.concurrency.split(",")):
                r = load(port, "bert", b"", {}, c, a.seconds, variants=variants, trim=True)
                r |= {"setup": label, "tokens_per_s": r["rps"] * mean_len, "mean_real_tokens": mean_len}
                r["padded_tokens_per_request"] = float(np.mean([pad(n) for n in seqs]))
                rows.append(r)
                print(
                    f"[seqlen] {label} c={c}: {r['rps']:.1f} req/s ({r['tokens_per_s']:.0f} real tokens/s) "
                    f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms wrong {r['wrong']} errors {r['errors']}",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    fixed = {r["concurrency"]: r["rps"] for r in rows if r["setup"] == "fixed 512"}
    print(f"\nBERT-base, mixed lengths {SEQ_MIN}..{SEQ_MAX} (mean {mean_len:.0f}), batching on; hardware: {hardware}\n")
    print(
        "| artifact / client | c | tokens computed per request | req/s | real tokens/s | p50 ms | p99 ms "
        "| vs fixed 512 | wrong |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setup']} | {r['concurrency']} | {r['padded_tokens_per_request']:.0f} | {r['rps']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['rps'] / fixed[r['concurrency']]:.2f}x | {r['wrong']} |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps({"hardware": hardware, "lengths": seqs, "compile": artifacts, "rows": rows}, indent=2)
        )
    return 1 if any(r["wrong"] or r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
