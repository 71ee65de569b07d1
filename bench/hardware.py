"""What a benchmark ran on, printed with every table."""

from __future__ import annotations

import os
import platform
from typing import Any


def describe(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "device": device,
        # The lent GPU hosts run under gVisor (kernel "4.4.0", a user-space network stack) or in a
        # Firecracker VM (a real kernel): loopback HTTP differs by up to 2x between them.
        "kernel": platform.release(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
