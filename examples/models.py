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


# --- the same models in the formats users bring from other servers -----------------------------

INPUTS = {
    "mlp": [{"name": "x", "dtype": "float32", "shape": [-1, 16]}, {"name": "y", "dtype": "float32", "shape": [-1, 4]}],
    "conv": [{"name": "image", "dtype": "float32", "shape": [-1, 3, 16, 16]}],
}
CLASSES = {"mlp": TwoInputMLP, "conv": SmallConvNet}


def kiln_yaml(name: str) -> str:
    import yaml

    return yaml.safe_dump({"inputs": INPUTS[name]}, sort_keys=False)


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
