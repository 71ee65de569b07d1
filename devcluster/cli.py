"""`kiln-devcluster`: build (or reuse) the binaries and run the local control plane by hand.

kiln-devcluster up                 # control plane + node agent; Ctrl-C stops and cleans up
kubectl --kubeconfig ~/.cache/kiln/dev/kubeconfig get nodes
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from kiln.devcluster.cluster import LocalCluster, log

BUILD_SCRIPT = Path(__file__).with_name("build.sh")
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def ensure_binaries() -> Path:
    """Run build.sh (a no-op when cached) and return the bin folder it prints last."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def default_nodes(gpu_product: str | None) -> list[dict[str, object]]:
    nodes: list[dict[str, object]] = [{"name": "cpu-0", "cpu": 8, "memory": "32Gi"}]
    if gpu_product:
        nodes.append(
            {"name": "gpu-0", "cpu": 8, "memory": "64Gi", "gpus": 1, "labels": {"nvidia.com/gpu.product": gpu_product}}
        )
    return nodes


def up(args: argparse.Namespace) -> int:
    bin_dir = ensure_binaries()
    root: Path = args.root
    if root.exists():
        shutil.rmtree(root)
    cluster = LocalCluster(bin_dir=bin_dir, root=root)

    def stop(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with cluster:
        cluster.start_agent(
            default_nodes(None if args.no_gpu_node else args.gpu_product),
            images=dict(i.split("=", 1) for i in args.image),
        )
        log(f"kubectl --kubeconfig {cluster.kubeconfig} get nodes   (Ctrl-C to stop)")
        try:
            signal.pause()
        except KeyboardInterrupt:
            log("stopping")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln-devcluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build or reuse the pinned binaries; prints their folder")
    b.set_defaults(run=lambda _: print(ensure_binaries()) or 0)
    u = sub.add_parser("up", help="run the control plane and node agent until Ctrl-C")
    u.add_argument("--root", type=Path, default=Path.home() / ".cache" / "kiln" / "dev")
    u.add_argument("--gpu-product", default=DEFAULT_GPU_PRODUCT, help="label of the fake GPU node")
    u.add_argument("--no-gpu-node", action="store_true")
    u.add_argument("--image", action="append", default=[], metavar="NAME=COMMAND")
    u.set_defaults(run=up)
    args = p.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
