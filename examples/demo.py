"""Kiln's main job end to end, on this machine: control plane, operator, compile, serve, infer.

Run through examples/demo.sh (it installs what is needed first). Prints each
phase with its duration, then tears everything down.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.devcluster.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = Path("/var/tmp/kiln-demo/mlp.pt2")  # the path examples/torchmodel.yaml names
TIMINGS: list[tuple[str, float]] = []


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    say(f"{name} ...")
    start = time.monotonic()
    yield
    TIMINGS.append((name, time.monotonic() - start))
    say(f"{name}: {TIMINGS[-1][1]:.1f} s")


def wait(what: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while (value := what()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s")
        time.sleep(every)
    return value


def start_operator(cluster: LocalCluster, runtime_image: str, **env: str) -> subprocess.Popen[bytes]:
    """kiln-operator as one standalone local process against `cluster`, logging into its log folder."""
    full = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "KILN_STANDALONE": "true",
        "KILN_RUNTIME_IMAGE": runtime_image,
        "KILN_LIVENESS_ENDPOINT": "http://127.0.0.1:0/healthz",
        **env,
    }
    log = (cluster.log_dir / "operator.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "kiln.operator.main"], env=full, stdout=log, stderr=subprocess.STDOUT
    )


def main() -> int:
    from examples import models
    from kiln.devcluster.cli import default_nodes, ensure_binaries
    from kiln.devcluster.cluster import LocalCluster

    with phase("control plane (etcd, kube-apiserver, controller-manager, scheduler) and node agent"):
        cluster = LocalCluster(bin_dir=ensure_binaries())
        cluster.__enter__()
    operator: subprocess.Popen[bytes] | None = None
    try:
        cluster.start_agent(default_nodes(None))
        kubectl = cluster.kubectl
        with phase("install CRDs"):
            kubectl("apply", "-f", str(ROOT / "crds"))
            kubectl("wait", "--for=condition=Established", "crd/torchmodels.kiln.dev", "--timeout=30s")
        with phase("start the operator"):
            operator = start_operator(cluster, "kiln-runtime:dev", KILN_RESYNC_SECONDS="1")
        with phase(f"export a small MLP with torch.export to {ARCHIVE}"):
            ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
            models.export("mlp", ARCHIVE)
        with phase("kubectl apply -f examples/torchmodel.yaml"):
            say(kubectl("apply", "-f", str(ROOT / "examples" / "torchmodel.yaml")).stdout.strip())
        with phase("compile once (AOTInductor) and roll out the serving pod"):
            seen = ""

            def ready() -> bool:
                nonlocal seen
                tm = json.loads(kubectl("get", "tm", "mlp", "-o", "json").stdout)
                status = tm.get("status") or {}
                line = f"phase={status.get('phase')} " + " ".join(
                    f"[{t['gpu']}: artifact {t['phase']}, {t['readyReplicas']}/{t['replicas']} ready, {t['message']}]"
                    for t in status.get("targets", [])
                )
                if line != seen:
                    say("  " + line)
                    seen = line
                if status.get("phase") == "Failed":
                    raise RuntimeError(f"TorchModel failed: {line}")
                return status.get("phase") == "Ready"

            wait(ready, timeout=900)
        say(kubectl("get", "torchmodels,compiledartifacts", "-o", "wide").stdout)
        with phase("inference over HTTP (Open Inference Protocol v2)"):
            ip = kubectl(
                "get",
                "pods",
                "-l",
                "kiln.dev/model=mlp",
                "--field-selector=status.phase=Running",
                "-o",
                "jsonpath={.items[0].status.podIP}",
            ).stdout
            x, y = models.examples("mlp", batch=2, seed=1)
            body = {
                "inputs": [
                    {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()},
                    {"name": "y", "shape": list(y.shape), "datatype": "FP32", "data": y.flatten().tolist()},
                ]
            }
            req = urllib.request.Request(
                f"http://{ip}:8080/v2/models/mlp/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = json.load(resp)
            out = answer["outputs"][0]
            say(f"POST http://{ip}:8080/v2/models/mlp/infer → {out['name']} {out['shape']}: {out['data'][:4]} ...")
            want = models.eager("mlp", x, y)[0].flatten().tolist()
            error = max(abs(a - b) for a, b in zip(out["data"], want, strict=True))
            say(f"max difference from eager PyTorch: {error:.2e}")
            if error > 1e-3:
                raise RuntimeError("the served answer differs from eager PyTorch")
        with phase("inference over gRPC (the same protocol, the pod's port grpc)"):
            import numpy as np
            import tritonclient.grpc as triton

            with contextlib.closing(triton.InferenceServerClient(f"{ip}:8081")) as client:
                inputs = [triton.InferInput("x", list(x.shape), "FP32"), triton.InferInput("y", list(y.shape), "FP32")]
                inputs[0].set_data_from_numpy(x.numpy())
                inputs[1].set_data_from_numpy(y.numpy())
                got = client.infer("mlp", inputs).as_numpy("output0")
            same = bool(np.array_equal(got.flatten(), np.array(out["data"], dtype=np.float32)))
            say(f"ModelInfer {ip}:8081 (tritonclient.grpc) → output0 {list(got.shape)}; same as over HTTP: {same}")
            if not same:
                raise RuntimeError("the gRPC answer differs from the HTTP one")
    finally:
        with phase("tear down"):
            if operator is not None:
                operator.terminate()
                operator.wait(30)
            cluster.__exit__(None, None, None)
    print("\nphase timings on this machine:")
    for name, seconds in TIMINGS:
        print(f"  {seconds:7.1f} s  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
