"""Serving speed of this checkout's kiln-serve against an older Kiln's, on one machine, alternated.

    git worktree add /tmp/kiln-old 761d7d7 && pip install --no-deps --target /tmp/kiln-old-site /tmp/kiln-old
    PYTHONPATH=/tmp/kiln-old-site python -P -m kiln.runtime.compile --uri file://<mlp.pt2> --mode aot \\
        --device cpu --cache /tmp/kiln-old-cache --batch-max 16
    python -m bench.against_old --old-site /tmp/kiln-old-site --old-artifact /tmp/kiln-old-cache/<key> \\
        --artifact /var/tmp/kiln-bench/cache-mlp/<key> [--rounds 3 --seconds 5 --concurrency 1,8,64]

A target stated against an old results file (issue 15: "2x docs/results/serving-cpu.json") compares
machines as well as code when the machine changed; this runs both servers on this one, the same client
(kiln-loadgen, Go) and the same settings: one process, batching on (max batch 16, 1 ms), each artifact
compiled by its own kiln-compile, every answer checked against eager PyTorch. Rounds alternate the two
so the host's noise falls on both; each row records the VM's steal time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.coldstart import free_port, kill_tree
from bench.hardware import describe
from bench.serving import answers, load, wait_ready

SETTINGS = ["--host=127.0.0.1", "--model-name=mlp", "--device=cpu", "--max-queue=4096", "--max-batch-size=16"]


def start(a: argparse.Namespace, which: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    common = [*SETTINGS, f"--port={port}", "--max-delay-ms=1"]
    env = {**os.environ, "KILN_LOADER": "lean"}
    if which == "old":  # its entry point then: kiln.runtime.server, no intake processes yet
        cmd = [sys.executable, "-P", "-m", "kiln.runtime.server", *common, f"--artifact={a.old_artifact}"]
        env["PYTHONPATH"] = str(a.old_site)
    else:
        cmd = [sys.executable, "-P", "-m", "kiln.runtime.serve", *common, f"--artifact={a.artifact}"]
        cmd.append("--intake-processes=0")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(port, log)
    except TimeoutError:
        kill_tree(proc.pid)
        raise
    return proc, port


def steal_ticks() -> int:
    with open("/proc/stat") as fh:
        return int(fh.readline().split()[8])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-site", type=Path, required=True, help="the old Kiln installed with pip --target")
    p.add_argument("--old-artifact", type=Path, required=True, help="the MLP compiled by the old kiln-compile")
    p.add_argument("--artifact", type=Path, required=True, help="the MLP compiled by this checkout")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    hardware = describe("cpu")
    print(f"[against_old] {hardware}", flush=True)
    variants = answers("mlp", "cpu", 8)
    body, headers, _ = variants[0]
    tick = os.sysconf("SC_CLK_TCK")
    rows: list[dict[str, Any]] = []
    for r in range(a.rounds):
        for which in ("old", "new"):
            proc, port = start(a, which, Path(f"/tmp/kiln-against-old-{which}.log"))
            try:
                for c in (int(x) for x in a.concurrency.split(",")):
                    before = steal_ticks()
                    row = load(port, "mlp", body, headers, c, a.seconds, variants=variants, client="go")
                    row |= {"code": which, "round": r, "steal_cores": (steal_ticks() - before) / tick / a.seconds}
                    rows.append(row)
                    print(
                        f"[against_old] round {r} {which} c={c}: {row['rps']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
                        f"{row['errors']} errors, {row['wrong']} wrong, steal {row['steal_cores']:.2f} cores",
                        flush=True,
                    )
            finally:
                kill_tree(proc.pid)
    print(f"\n[against_old] medians over {a.rounds} rounds, this checkout against {a.old_site}:")
    for c in sorted({row["concurrency"] for row in rows}):
        old, new = (
            statistics.median(x["rps"] for x in rows if x["code"] == w and x["concurrency"] == c)
            for w in ("old", "new")
        )
        print(f"[against_old] c={c}: old {old:.0f} req/s, new {new:.0f} req/s: {new / old:.2f}x")
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware, "old_site": str(a.old_site), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
