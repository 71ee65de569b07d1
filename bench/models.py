"""Benchmark models: the small MLP, ResNet-50 and a BERT-base encoder at sequence 128.

Random weights, built by torchvision and transformers without downloads, exported
with torch.export and a dynamic batch dimension.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from examples import models as example_models

SEQ = 128


class BertEncoder(nn.Module):
    """BERT-base returning plain tensors (last hidden state, pooled)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(), add_pooling_layer=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return example_models.build("mlp")
    if name == "resnet50":
        from torchvision.models import resnet50

        return resnet50().eval()
    if name == "bert":
        return BertEncoder().eval()
    raise ValueError(name)


def inputs(name: str, batch: int, device: str = "cpu", seq: int = SEQ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    if name == "mlp":
        out: tuple[torch.Tensor, ...] = example_models.examples("mlp", batch, seed=batch)
    elif name == "resnet50":
        out = (torch.randn(batch, 3, 224, 224, generator=g),)
    else:
        out = (torch.randint(0, 30000, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.int64))
    return tuple(t.to(device) for t in out)


def names(name: str) -> list[str]:
    return {"mlp": ["x", "y"], "resnet50": ["x"], "bert": ["input_ids", "attention_mask"]}[name]


def export(name: str, path: Path, batch_max: int, seq: int | tuple[int, int] = SEQ) -> Path:
    """The model as an ExportedProgram archive, batch dynamic; BERT at `seq` tokens, or dynamic over (min, max)."""
    model = build(name)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=batch_max)}
    if isinstance(seq, tuple):
        dims[1] = torch.export.Dim("seq", min=seq[0], max=seq[1])
    args = inputs(name, 2, seq=seq if isinstance(seq, int) else min(max(SEQ, seq[0]), seq[1]))
    program = torch.export.export(model, args, dynamic_shapes=tuple(dims for _ in args), strict=False)
    torch.export.save(program, str(path))
    return path
