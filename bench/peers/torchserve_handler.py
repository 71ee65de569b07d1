"""TorchServe handler: eager PyTorch, batched by TorchServe, raw float32 rows in and out."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.peers import rows

_state: dict[str, Any] = {}


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    if data is None:
        return None
    if "model" not in _state:
        _state["model"], _state["shapes"] = rows.build(), rows.spec()["shapes"]
    batch = [np.frombuffer(bytes(d.get("body") or d.get("data")), dtype=np.float32) for d in data]
    out = rows.run(_state["model"], rows.split(batch, _state["shapes"]))
    return [r.tobytes() for r in out]
