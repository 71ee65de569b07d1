"""Small example models for the demo, tests and benchmarks.

Built here (no downloads) and exported with a dynamic batch dimension.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TwoInputMLP(nn.Module):
    """Two named inputs (x: [B, 16], y: [B, 4]) and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x) + y
        return out, out.softmax(dim=-1)


class SmallConvNet(nn.Module):
    """One image input [B, 3, 16, 16] → 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


def examples(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(batch, 16, generator=g), torch.randn(batch, 4, generator=g)
    return (torch.randn(batch, 3, 16, 16, generator=g),)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (TwoInputMLP() if name == "mlp" else SmallConvNet()).eval()


def export(name: str, path: Path, dynamic: bool = True, seed: int = 0) -> Path:
    """torch.export.save an ExportedProgram of the model (weights from `seed`) to `path`."""
    model = build(name, seed)
    args = examples(name)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=64)
        shapes = tuple({0: batch} for _ in args)
    program = torch.export.export(model, args, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def eager(name: str, *inputs: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = build(name, seed)(*inputs)
    return list(out) if isinstance(out, tuple) else [out]
