"""Small example models for the demo, tests and benchmarks, and the archive formats users bring.

Built here (no downloads) and exported with a dynamic batch dimension; the encoder's
sequence length is dynamic too (2..64), and `mixed` takes int64, fp16 and bf16 inputs.
"""

from __future__ import annotations

import threading
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


class TinyEncoder(nn.Module):
    """A variable-length text encoder: token ids [B, S] (int64) and a mask [B, S] → a dict of
    `pooled` [B, 32] and `hidden` [B, S, 32]. Self-attention over S, so every length gives other numbers."""

    VOCAB, WIDTH, MAX_LEN = 1000, 32, 64

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, self.WIDTH)
        self.position = nn.Embedding(self.MAX_LEN, self.WIDTH)
        # Attention written out: nn.MultiheadAttention exported on a CPU and moved to CUDA does not
        # compile there (its graph views SDPA's output with the CPU kernel's strides).
        self.qkv = nn.Linear(self.WIDTH, 3 * self.WIDTH)
        self.mlp = nn.Sequential(nn.Linear(self.WIDTH, 64), nn.GELU(), nn.Linear(64, self.WIDTH))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.position(positions)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2)) * self.WIDTH**-0.5
        h = h + scores.softmax(-1) @ v
        h = h + self.mlp(h)
        weights = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return {"pooled": pooled, "hidden": h}


class MixedDtypes(nn.Module):
    """Inputs of three dtypes: `tokens` int64 [B, 8], `scale` fp16 [B, 4], `bias` bf16 [B, 4] → fp32 and bf16 out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 4)

    def forward(
        self, tokens: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.embed(tokens).sum(1) * scale.float() + bias.float()
        return mixed, mixed.to(torch.bfloat16)


BUILDERS = {"mlp": TwoInputMLP, "conv": SmallConvNet, "encoder": TinyEncoder, "mixed": MixedDtypes}


def examples(name: str, batch: int = 2, seed: int = 0, length: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(batch, 16, generator=g), torch.randn(batch, 4, generator=g)
    if name == "encoder":
        ids = torch.randint(0, TinyEncoder.VOCAB, (batch, length), generator=g)
        mask = (torch.rand(batch, length, generator=g) > 0.2).to(torch.int64)
        return ids, mask
    if name == "mixed":
        tokens = torch.randint(0, 100, (batch, 8), generator=g)
        return tokens, torch.randn(batch, 4, generator=g).half(), torch.randn(batch, 4, generator=g).bfloat16()
    return (torch.randn(batch, 3, 16, 16, generator=g),)


_BUILDING = threading.Lock()


def build(name: str, seed: int = 0) -> nn.Module:
    """The model with weights from `seed` alone: builds in other threads cannot interleave with
    it, and the global random state is left as it was (tests do not depend on their order)."""
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[name]().eval()


def export(name: str, path: Path, dynamic: bool = True, seed: int = 0) -> Path:
    """torch.export.save an ExportedProgram of the model (weights from `seed`) to `path`.

    The encoder's sequence length is dynamic too (2..64), as a user exports a text model."""
    model = build(name, seed)
    args = examples(name)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=64)
        if name == "encoder":
            seq = torch.export.Dim("seq", min=2, max=TinyEncoder.MAX_LEN)
            shapes = tuple({0: batch, 1: seq} for _ in args)
        else:
            shapes = tuple({0: batch} for _ in args)
    program = torch.export.export(model, args, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def eager(name: str, *inputs: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = build(name, seed)(*inputs)
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, tuple) else [out]


# --- the same models in the formats users bring from other servers -----------------------------

SEQ = {"name": "seq", "min": 2, "max": TinyEncoder.MAX_LEN}
INPUTS = {
    "mlp": [{"name": "x", "dtype": "float32", "shape": [-1, 16]}, {"name": "y", "dtype": "float32", "shape": [-1, 4]}],
    "conv": [{"name": "image", "dtype": "float32", "shape": [-1, 3, 16, 16]}],
    "encoder": [
        {"name": "ids", "dtype": "int64", "shape": [-1, dict(SEQ)]},
        {"name": "mask", "dtype": "int64", "shape": [-1, dict(SEQ)]},
    ],
}
OUTPUTS = {"encoder": ["pooled", "hidden"]}
CLASSES = BUILDERS


def kiln_yaml(name: str) -> str:
    import yaml

    config: dict[str, object] = {"inputs": INPUTS[name]}
    if name in OUTPUTS:
        config["outputs"] = OUTPUTS[name]
    return yaml.safe_dump(config, sort_keys=False)


def module_source(name: str) -> str:
    """model.py as a user would write it: imports and one nn.Module subclass."""
    import inspect

    return "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(CLASSES[name])


def write_module_and_weights(name: str, folder: Path, seed: int = 0) -> Path:
    """Triton's layout in `folder`: model.py, model.pt (state dict) and kiln.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(module_source(name))
    torch.save(build(name, seed).state_dict(), folder / "model.pt")
    (folder / "kiln.yaml").write_text(kiln_yaml(name))
    return folder


def pack(folder: Path, dest: Path) -> Path:
    """`folder`'s files as a .tar.gz or .zip (by dest's suffix), at the archive's top level."""
    import tarfile
    import zipfile

    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.iterdir()):
                z.write(path, path.name)
    else:
        with tarfile.open(dest, "w:gz") as t:
            for path in sorted(folder.iterdir()):
                t.add(path, path.name)
    return dest


def save_torchscript(name: str, path: Path, seed: int = 0) -> Path:
    """torch.jit.trace of the model, with kiln.yaml embedded as an extra file."""
    traced = torch.jit.trace(build(name, seed), examples(name))
    torch.jit.save(traced, str(path), _extra_files={"kiln.yaml": kiln_yaml(name)})
    return path
