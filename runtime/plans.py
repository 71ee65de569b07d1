"""Request plans: what a binary request's header says, worked out once per distinct header.

Serve path, requests (framework-free). Clients of the binary tensor extension (tritonclient,
kiln's benchmarks) send the same JSON header with every request; only the tensor bytes after it
change. Parsing that header (json, pydantic), checking it against the signature and building the
answer's JSON header cost about 30 µs a request, a quarter of a small CPU model's whole request
in-process (docs/benchmarks.md §14), for results that depend on the header's bytes alone. A plan
keeps them, keyed by those bytes; a request whose header matches one and whose body has the length
the header implies takes its tensors from the body and its answer header from the plan. Headers
that carry tensor values (JSON data) are parsed every time. gRPC requests are planned the same way,
keyed by their fields but the raw tensors (kiln.runtime.grpc_wire).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kiln.runtime.protocol import InferenceRequest, InferenceResponse, RequestInput
from kiln.runtime.tensors import from_rest, raw_bytes

MAX_PLANS = 256  # distinct headers kept (a client that changes its header each time only churns them)
MAX_HEADER_BYTES = 8192
MAX_ANSWERS = 16  # answer headers per plan, one per set of output shapes

Shapes = tuple[tuple[int, ...], ...]
Encode = Callable[[InferenceRequest, list[np.ndarray]], tuple[InferenceResponse, list[bytes]]]
Render = Callable[[InferenceResponse], bytes]  # the answer's header as the protocol writes it


@dataclass
class Plan:
    """One checked request header: its inputs in signature order with where their bytes lie in the body."""

    request: InferenceRequest
    inputs: list[tuple[RequestInput, int, int]]  # the input, its bytes' start and end in the body (-1: JSON data)
    rows: int
    length: int  # of the body
    outputs: list[str]  # the signature's output names, in its order
    answers: dict[Shapes, tuple[bytes, list[int]]] = field(default_factory=dict)  # header, outputs it lists

    @property
    def reusable(self) -> bool:
        return all(start >= 0 for _, start, _ in self.inputs)

    def tensors(self, body: memoryview) -> list[np.ndarray]:
        return [from_rest(inp, body[start:end] if start >= 0 else None) for inp, start, end in self.inputs]

    def answer(self, outputs: list[np.ndarray], encode: Encode, render: Render) -> tuple[bytes, list[bytes]]:
        """The answer's header (`render`ed) and binary chunks: the header from this plan when outputs of these
        shapes were answered before, all binary."""
        shapes = tuple(o.shape for o in outputs)
        known = self.answers.get(shapes)
        if known is not None:
            header, listed = known
            return header, [raw_bytes(outputs[i]) for i in listed]
        result, chunks = encode(self.request, outputs)
        header = render(result)
        if all(o.data is None for o in result.outputs) and len(self.answers) < MAX_ANSWERS:
            self.answers[shapes] = header, [self.outputs.index(o.name) for o in result.outputs]
        return header, chunks


class Plans:
    """Plans by header bytes, at most MAX_PLANS (the oldest go first)."""

    def __init__(self) -> None:
        self.by_header: dict[bytes, Plan] = {}

    def get(self, header: bytes, length: int) -> Plan | None:
        plan = self.by_header.get(header)
        return plan if plan is not None and plan.length == length else None

    def keep(self, header: bytes, plan: Plan) -> None:
        if not plan.reusable or len(header) > MAX_HEADER_BYTES:
            return
        if len(self.by_header) >= MAX_PLANS:
            del self.by_header[next(iter(self.by_header))]
        self.by_header[header] = plan
