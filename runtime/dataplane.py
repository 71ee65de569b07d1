"""The dataplane: check requests against the model's signature, batch, call, shape responses.

Serve path, dataplane (no HTTP). Knows the loaded model and its signature; raises domain
errors (InvalidInput, NotReady, ...) that kiln.runtime.inference maps to codes. `ModelInfo`
is all an intake process learns of the model.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from pydantic import BaseModel

from kiln.enums import Loader, WarmSizes
from kiln.manifest import BATCH, Signature, TensorSpec
from kiln.runtime.batching import INLINE_S, Batcher, FinishFn, MergeFn, RunFn
from kiln.runtime.errors import InvalidInput, ModelNotFound, NotReady
from kiln.runtime.loader import LoadedModel, WarmPlan, warm_sizes, warm_up
from kiln.runtime.metrics import Metrics
from kiln.runtime.plans import Plan
from kiln.runtime.protocol import InferenceRequest, InferenceResponse, MetadataTensor, ModelMetadata, RequestInput
from kiln.runtime.tensors import to_rest

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    batchable: bool = True
    warm: WarmSizes = WarmSizes.auto
    grow: bool = True


def describe(spec: TensorSpec) -> str:
    return f"{spec.name} ({spec.datatype} {spec.shape})"


def dynamic_note(spec: TensorSpec) -> str:
    """`(-1: batch, seq)`: what the -1s of an expected shape stand for."""
    names = [n for n in spec.dim_names() if n]
    return f" (-1: {', '.join(names)})" if names else ""


class ModelInfo(BaseModel):
    """What request checking and metadata need of a loaded model: all an intake process knows of it."""

    signature: Signature
    rows: int  # most rows per request and per model call
    batch_dim: int
    loader: Loader
    fallback: str | None = None
    threads: dict[str, int] = {}
    torch_imported: bool  # in the process that runs the model

    @classmethod
    def of(cls, model: LoadedModel, max_batch_size: int) -> ModelInfo:
        return cls(
            signature=model.signature,
            rows=min(max_batch_size, model.batch_max),
            batch_dim=model.batch_dim,
            loader=model.loader,
            fallback=model.fallback,
            threads=model.threads,
            torch_imported="torch" in sys.modules,
        )


def spans(sizes: list[int]) -> str:
    """`1, 2, 64, 3..63`: sizes with runs of consecutive ones shortened."""
    out: list[list[int]] = []
    for size in sizes:
        if out and size == out[-1][-1] + 1:
            out[-1].append(size)
        else:
            out.append([size])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in out)


class DataPlane:
    """One served model. `load()` runs in a worker thread; `ready` flips after warm-up.

    `model` is set where the model runs; `info` wherever requests are checked (an intake process
    has only `info`, from the model process's ready frame)."""

    def __init__(self, name: str, batching: BatchSettings, metrics: Metrics) -> None:
        self.name = name
        self.batching = batching
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.info: ModelInfo | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False  # shutting down: readiness off, requests still answered
        self.active = 0  # requests between arrival and answer: the batcher waits only if others may join
        self.intakes = 0  # intake processes in front of the model process (0: this process serves HTTP)
        self.arriving: Callable[[], int] = lambda: 0  # requests still being received by those intakes

    # -- loading -------------------------------------------------------------------
    def load(self, loader: Callable[[], LoadedModel]) -> None:
        start = time.perf_counter()
        model = loader()
        self.metrics.load_seconds.labels(self.name, model.loader).set(time.perf_counter() - start)
        self.metrics.loader.labels(self.name, model.loader, model.fallback or "").set(1)
        log.info("loaded %s with the %s loader in %.2f s", self.name, model.loader, time.perf_counter() - start)
        start = time.perf_counter()
        self.warm_up(model, self.warm_sizes(model).before)
        self.metrics.warmup_seconds.labels(self.name).set(time.perf_counter() - start)
        self.model = model
        self.info = ModelInfo.of(model, self.batching.max_batch_size)

    def warm_sizes(self, model: LoadedModel) -> WarmPlan:
        warm = self.batching.warm
        every = warm == WarmSizes.every or (
            warm == WarmSizes.auto and model.device != "cpu" and model.loader.runs_aotinductor
        )
        return warm_sizes(model, self.batching.max_batch_size, every)

    def warm_up(self, model: LoadedModel, sizes: list[int]) -> None:
        """Call the model once at each batch size it has not run yet (the preload thread may have run them)."""
        warm_up(model, sizes)
        log.info("warmed up %s at batch sizes %s", self.name, sizes)

    def warm_between_requests(self, model: LoadedModel, sizes: list[int]) -> Callable[[], bool]:
        """The model thread's idle work: one call at the next of `sizes` per step (False once done)."""
        left, spent = list(sizes), 0.0
        gauge = self.metrics.warm_sizes_left.labels(self.name)
        gauge.set(len(left))

        def step() -> bool:
            nonlocal spent
            if not left:
                log.info(
                    "warmed up %s in the model thread at batch sizes %s between requests (%.2f s of calls)",
                    self.name,
                    spans(sizes),
                    spent,
                )
                return False
            start = time.perf_counter()
            warm_up(model, [left.pop(0)], again=True)  # the preload thread's calls do not count here
            spent += time.perf_counter() - start
            gauge.set(len(left))
            return True

        return step

    def start(self) -> None:
        """Called on the event loop once load() returned: start batching, report ready."""
        assert self.model is not None
        model = self.model
        run: RunFn = model.fn
        merge: MergeFn | None = None
        finish: FinishFn | None = None
        plan = self.warm_sizes(model)
        if model.pipeline is not None:  # copies overlap the model's work; another thread waits for results
            run, merge, finish = model.pipeline.launch, model.pipeline.upload, model.pipeline.finish
        assert self.info is not None
        self.batcher = Batcher(
            run,
            self.info.rows,
            self.batching.max_delay_ms / 1000,
            self.batching.max_queue,
            observe=lambda rows, n, waited: self.metrics.observe_batch(self.name, rows, n, waited),
            pending=lambda: self.active + self.arriving(),
            merge=merge,
            dim=model.batch_dim,
            batchable=self.batching.batchable,
            finish=finish,
            idle=self.warm_between_requests(model, plan.served) if plan.served else None,
            grow=self.batching.grow,
            inline_s=INLINE_S if model.device == "cpu" else 0.0,
        )
        self.batcher.start()
        self.ready = True

    # -- requests --------------------------------------------------------------------
    @property
    def reports_ready(self) -> bool:
        """What readiness probes and the protocol's ready calls answer: loaded, and not draining."""
        return self.ready and not self.draining

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {self.name!r}")

    @property
    def loaded(self) -> ModelInfo:
        if self.info is None:
            raise NotReady(f"model {self.name!r} is still loading")
        return self.info

    @property
    def signature(self) -> Signature:
        return self.loaded.signature

    def metadata(self) -> ModelMetadata:
        info = self.loaded
        sig = info.signature
        return ModelMetadata(
            name=self.name,
            versions=["1"],
            platform=f"kiln_{info.loader}",
            inputs=[MetadataTensor(**s.model_dump()) for s in sig.inputs],
            outputs=[MetadataTensor(**s.model_dump()) for s in sig.outputs],
            parameters={
                "max_batch_size": info.rows,
                "batch_dim": info.batch_dim,
                "dynamic_dims": {name: rng.model_dump() for name, rng in sig.dims.items()},
                "input_dims": {s.name: s.dim_names() for s in sig.inputs},
                "batchable": self.batching.batchable,
                "loader": info.loader,
                **({"loader_fallback": info.fallback} if info.fallback else {}),
                "torch_imported": info.torch_imported,
                "intake_processes": self.intakes,
                **info.threads,
            },
        )

    def check(self, request: InferenceRequest) -> tuple[list[RequestInput], int]:
        """The request's inputs in signature order, checked against the signature, and the batch size they share."""
        sig = self.signature
        expected = {s.name: s for s in sig.inputs}
        given = {i.name: i for i in request.inputs}
        unknown = sorted(set(given) - set(expected))
        missing = sorted(set(expected) - set(given))
        if unknown or missing or len(given) != len(request.inputs):
            raise InvalidInput(
                f"inputs must be exactly {', '.join(describe(s) for s in sig.inputs)}; "
                f"got {[i.name for i in request.inputs]}"
            )
        inputs: list[RequestInput] = []
        seen: dict[str, tuple[int, str]] = {}
        for spec in sig.inputs:
            inp = given[spec.name]
            if inp.datatype != spec.datatype:
                raise InvalidInput(f"input {spec.name!r} has datatype {inp.datatype}, expected {spec.datatype}")
            if len(inp.shape) != len(spec.shape) or any(
                e != -1 and g != e for g, e in zip(inp.shape, spec.shape, strict=True)
            ):
                raise InvalidInput(
                    f"input {spec.name!r} has shape {inp.shape}, expected {spec.shape}{dynamic_note(spec)}"
                )
            for index, name in enumerate(spec.dim_names()):
                if name is not None:
                    self._check_dim(spec.name, index, name, inp.shape[index], seen)
            inputs.append(inp)
        return inputs, seen.get(BATCH, (1, ""))[0]

    def plan(self, request: InferenceRequest, layout: Mapping[str, tuple[int, int]], length: int) -> Plan:
        """The request checked, as a plan (kiln.runtime.plans): its inputs in signature order, with where the
        binary ones (named in `layout`) lie in a body of `length` bytes."""
        inputs, rows = self.check(request)
        outputs = [spec.name for spec in self.signature.outputs]
        return Plan(request, [(inp, *layout.get(inp.name, (-1, -1))) for inp in inputs], rows, length, outputs)

    def _check_dim(self, tensor: str, index: int, name: str, size: int, seen: dict[str, tuple[int, str]]) -> None:
        """One dynamic dimension of a request: inside its range, and equal wherever the name recurs."""
        info = self.loaded
        if name == BATCH:
            limit = info.rows
            if not 1 <= size <= limit:
                raise InvalidInput(
                    f"input {tensor!r} has batch size {size}, expected 1..{limit} (batch dimension {index})"
                )
        else:
            rng = info.signature.dims.get(name)
            if rng is not None and not rng.min <= size <= rng.max:
                raise InvalidInput(
                    f"input {tensor!r} dimension {index} ({name}) is {size}, outside its range {rng}: "
                    f"the model was compiled for {name} in {rng}"
                )
        if name in seen and seen[name][0] != size:
            if name == BATCH:
                raise InvalidInput(f"all inputs must share one batch size, got {sorted({seen[name][0], size})}")
            raise InvalidInput(
                f"input {tensor!r} dimension {index} ({name}) is {size}, but input {seen[name][1]!r} has "
                f"{seen[name][0]}: inputs that share dimension {name} must agree"
            )
        seen.setdefault(name, (size, tensor))

    def not_ready(self) -> NotReady:
        return NotReady(f"model {self.name!r} is not ready")

    async def call(self, tensors: list[np.ndarray], rows: int, answer: Callable[[list[np.ndarray]], T]) -> T:
        """`answer` made of the model's outputs for checked tensors, while those outputs are valid."""
        if not self.ready:
            raise self.not_ready()
        return answer(await self.run(tensors, rows))

    async def run(self, tensors: list[np.ndarray], rows: int) -> list[np.ndarray]:
        """Checked tensors through the batcher and the model (in the model's process)."""
        if self.batcher is None:
            raise self.not_ready()
        self.active += 1
        try:
            return await self.batcher.submit(tensors, rows)
        finally:
            self.active -= 1

    def encode(self, request: InferenceRequest, outputs: list[np.ndarray]) -> tuple[InferenceResponse, list[bytes]]:
        specs = self.signature.outputs
        names = [s.name for s in specs]
        all_binary = bool((request.parameters or {}).get("binary_data_output", False))
        wanted = {o.name: bool((o.parameters or {}).get("binary_data", all_binary)) for o in request.outputs or []}
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; outputs are {names}")
        selected = wanted or dict.fromkeys(names, all_binary)
        response_outputs, chunks = [], []
        for spec, array in zip(specs, outputs, strict=True):
            if spec.name not in selected:
                continue
            out, raw = to_rest(spec.name, spec.datatype, array, selected[spec.name])
            response_outputs.append(out)
            if raw is not None:
                chunks.append(raw)
        return InferenceResponse(
            model_name=self.name, model_version="1", id=request.id, outputs=response_outputs
        ), chunks
