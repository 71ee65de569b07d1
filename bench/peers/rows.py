"""The wire format every peer accepts for a benchmark model: the float32 bytes of each input's rows,
concatenated (binary, like kiln-serve's binary tensor extension), and the first output back."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from bench import models


def spec() -> dict[str, object]:
    """{"model": name, "shapes": per-row shape of each input}, from KILN_PEER_SPEC."""
    return dict(json.loads(os.environ["KILN_PEER_SPEC"]))


def split(rows: list[np.ndarray], shapes: list[list[int]]) -> list[torch.Tensor]:
    """Rows of flat float32 values → one batched tensor per input."""
    stacked = np.stack(rows)
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(torch.from_numpy(stacked[:, offset : offset + size].reshape(len(rows), *shape).copy()))
        offset += size
    return out


def run(model: torch.nn.Module, inputs: list[torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        out = model(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    return first.reshape(first.shape[0], -1).numpy()


def build() -> torch.nn.Module:
    return models.build(str(spec()["model"]))
