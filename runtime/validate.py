"""Validate an artifact in a child process, exactly as kiln-serve loads it, against the program it came from.

Compile path. A library that crashes on load (see shared/notes/gpu-findings.md:
a segfault inside std::regex) kills only the child, and the compile fails with a
clear reason instead of shipping an artifact that crash-loops every replica.
Run as `python -m kiln.runtime.validate ARTIFACT PROGRAM DEVICE POINTS ATOL RTOL`, POINTS a JSON
list of {dimension: size} (the sizes of the dynamic dimensions at each compared call).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from kiln.enums import Loader
from kiln.manifest import Validation
from kiln.runtime.errors import ValidationFailed


def validate_in_child(
    artifact: Path, program: Path, device: str, points: list[dict[str, int]], atol: float, rtol: float, timeout: float
) -> Validation:
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "kiln.runtime.validate",
        str(artifact),
        str(program),
        device,
        json.dumps(points),
        str(atol),
        str(rtol),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ValidationFailed(f"loading the artifact did not finish within {timeout:.0f} s") from exc
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise ValidationFailed(
            f"loading the compiled artifact crashed the process ({name}); it would crash every replica"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValidationFailed(f"validation failed: {tail}")
    result = json.loads(lines[-1])
    if result.get("error"):
        raise ValidationFailed(result["error"])
    return Validation.model_validate(result["validation"])


def _child(argv: list[str]) -> int:
    from kiln.manifest import BATCH
    from kiln.runtime.loader import load_artifact

    artifact, program_path, device, points_arg, atol_arg, rtol_arg = argv
    points: list[dict[str, int]] = json.loads(points_arg)
    atol, rtol = float(atol_arg), float(rtol_arg)
    model = load_artifact(Path(artifact), device)  # first, as in a pod: the lean loader imports no torch
    if model.loader == Loader.lean and "torch" in sys.modules:
        return _report(error="the lean loader imported torch's Python package")
    import numpy as np
    import torch

    from kiln.runtime.export import load_exported
    from kiln.runtime.tensors import bf16_values, example_arrays
    from kiln.runtime.torch_arrays import to_numpy, to_torch

    if model.loader == Loader.torchscript:  # the reference is the TorchScript file itself: this checks load and shapes
        reference = torch.jit.load(program_path, map_location=device)
    else:
        reference = load_exported(Path(program_path)).module()

    def values(array: np.ndarray, datatype: str) -> np.ndarray:
        return (bf16_values(array) if datatype == "BF16" else array).astype(np.float64)

    max_abs = max_rel = 0.0
    out_types = [s.datatype for s in model.signature.outputs]
    for seed, sizes in enumerate(points):
        at = " ".join(f"{k}={v}" for k, v in sizes.items())
        arrays = example_arrays(model.signature, sizes, seed=seed)
        got = model.fn(arrays)
        with torch.inference_mode():
            inputs = [to_torch(a, s.datatype).to(device) for a, s in zip(arrays, model.signature.inputs, strict=True)]
            want = [to_numpy(w) for w in torch.utils._pytree.tree_leaves(reference(*inputs))]
        if len(got) != len(want):
            return _report(error=f"artifact returned {len(got)} outputs, the program {len(want)}")
        for g, w, datatype in zip(got, want, out_types, strict=True):
            if g.shape != w.shape:
                return _report(error=f"at {at}: output shape {list(g.shape)} != expected {list(w.shape)}")
            g64, w64 = values(g, datatype), values(w, datatype)
            error = float(np.abs(g64 - w64).max()) if g64.size else 0.0
            # Tolerance scales with the output's magnitude: GPU kernels (cuDNN vs Triton) and
            # reduction orders differ by a small fraction of the largest value, not of each value.
            scale = float(np.abs(w64).max()) if w64.size else 0.0
            max_abs = max(max_abs, error)
            max_rel = max(max_rel, error / scale if scale else 0.0)
            if not error <= atol + rtol * scale:  # NaN fails too
                return _report(
                    error=f"at {at}: compiled output differs from the program "
                    f"(max abs error {error:.3g} > atol {atol} + rtol {rtol} * max |output| {scale:.3g})"
                )
    batches = sorted({p[BATCH] for p in points if BATCH in p})
    validation = Validation(
        batch_sizes=batches, points=points, max_abs_error=max_abs, max_rel_error=max_rel, loader=model.loader
    )
    return _report(validation=validation.model_dump())


def _report(**fields: object) -> int:
    print(json.dumps(fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
