"""BentoML service: eager PyTorch behind a batchable API, float32 rows as a numpy array."""

from __future__ import annotations

import bentoml
import numpy as np

from bench.peers import rows


@bentoml.service(workers=1)
class Peer:
    def __init__(self) -> None:
        self.model = rows.build()
        self.shapes = rows.spec()["shapes"]

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=60000)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return rows.run(self.model, rows.split(list(x.astype(np.float32)), self.shapes))  # type: ignore[arg-type]
