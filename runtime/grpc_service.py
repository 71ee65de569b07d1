"""The Open Inference Protocol v2 over gRPC: the same dataplane as HTTP, on its own port.

Serve path, requests (beside kiln.runtime.inference, no HTTP). Triton's and KServe's clients
(`tritonclient.grpc`, KServe's `grpc_predict_v2.proto`) call ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata and ModelInfer; inputs come as `raw_input_contents` (little-endian
bytes, one entry per input) or typed `contents`, and outputs always go back as
`raw_output_contents`, as Triton answers. A request is checked, batched and answered by the
dataplane exactly as over HTTP. ModelInfer takes the message's bytes as grpc hands them over: its
tensors are read where they lie, and its checked plan is kept by the rest of its fields
(kiln.runtime.grpc_wire, kiln.runtime.plans), as an HTTP request's is by its JSON header. A domain
error becomes the gRPC status that means the same (a bad shape is INVALID_ARGUMENT naming the
expected one, a full queue UNAVAILABLE), counted in the same metrics with the status name as its
label. HTTP/2 is Kiln's own (kiln.runtime.grpc_transport, on the process's event loop, no grpcio), and
with intake processes the model process listens on the port and hands each connection to the intake
with the fewest open, as it does HTTP ones (kiln.runtime.intake_pool).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from kiln import __version__
from kiln.runtime import oip_v2_pb2 as pb
from kiln.runtime.dataplane import DataPlane
from kiln.runtime.errors import InvalidInput, KilnError, ModelFailed, ModelNotFound, NotReady, Overloaded
from kiln.runtime.grpc_transport import (
    CODE_NAMES,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    UNAVAILABLE,
    GrpcError,
    GrpcServer,
    Method,
)
from kiln.runtime.grpc_wire import plan_key, raw_output, split_request
from kiln.runtime.metrics import Metrics
from kiln.runtime.plans import Plan, Plans
from kiln.runtime.protocol import InferenceRequest, InferenceResponse, RequestInput, RequestOutput
from kiln.runtime.shm import Arena

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

SERVICE = "inference.GRPCInferenceService"
CODES: dict[type[KilnError], int] = {
    InvalidInput: INVALID_ARGUMENT,
    ModelNotFound: NOT_FOUND,
    NotReady: UNAVAILABLE,
    Overloaded: UNAVAILABLE,
}
# Typed contents by datatype: where an input's values are when they are not raw bytes.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "BF16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def to_request(message: pb.ModelInferRequest, raw_inputs: int) -> InferenceRequest:
    """The protocol's request model of a ModelInferRequest whose `raw_inputs` raw_input_contents were split off
    (kiln.runtime.grpc_wire): those inputs' bytes lie in the message, the others' values in typed contents."""
    if raw_inputs and raw_inputs != len(message.inputs):
        raise InvalidInput(f"{raw_inputs} raw_input_contents for {len(message.inputs)} inputs: send one per input")
    inputs = []
    for tensor in message.inputs:
        field = None if raw_inputs else CONTENTS.get(tensor.datatype)
        inputs.append(
            RequestInput(
                name=tensor.name,
                shape=list(tensor.shape),
                datatype=tensor.datatype,
                parameters={k: parameter(v) for k, v in tensor.parameters.items()} or None,
                data=list(getattr(tensor.contents, field)) if field else None,
            )
        )
    outputs = [RequestOutput(name=o.name, parameters={"binary_data": True}) for o in message.outputs]
    return InferenceRequest(
        id=message.id or None,
        parameters={"binary_data_output": True},  # raw_output_contents, always
        inputs=inputs,
        outputs=outputs or None,
    )


def response_header(result: InferenceResponse) -> bytes:
    """A ModelInferResponse without its raw_output_contents: the answer's header (kiln.runtime.plans)."""
    tensor = pb.ModelInferResponse.InferOutputTensor
    header: bytes = pb.ModelInferResponse(
        model_name=result.model_name,
        model_version=result.model_version or "",
        id=result.id or "",
        outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in result.outputs],
    ).SerializeToString()
    return header


def status_of(exc: KilnError) -> GrpcError:
    """The gRPC status that means what a domain error does (a bad shape: INVALID_ARGUMENT naming the expected one)."""
    return GrpcError(next((c for t, c in CODES.items() if isinstance(exc, t)), INTERNAL), str(exc))


def unary(kind: type[M], method: Callable[[M], Message]) -> Method:
    """A method whose request and answer are small protobuf messages: parsed and serialized here."""

    async def call(body: memoryview) -> list[bytes]:
        try:
            request = kind.FromString(bytes(body))
        except DecodeError as exc:
            raise GrpcError(INVALID_ARGUMENT, f"the request is not a valid {kind.__name__}: {exc}") from exc
        try:
            return [method(request).SerializeToString()]
        except KilnError as exc:
            raise status_of(exc) from exc

    return Method(call)


class InferenceService:
    """The six methods, over a dataplane (the model's own, or an intake's that forwards to it)."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane, self.metrics = plane, metrics
        self.plans = Plans()
        self.starts: dict[int, int] = {}  # message size -> where its first raw input started last time
        self.codes: dict[int, Any] = {}  # prometheus label children, resolved once per code
        self.inflight, self.latency = metrics.inflight.labels(plane.name), metrics.latency.labels(plane.name)

    def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.reports_ready)

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self.plane.check_name(request.name)
        return pb.ModelReadyResponse(ready=self.plane.reports_ready)

    def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="kiln", version=__version__, extensions=[])

    def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        self.plane.check_name(request.name)
        meta = self.plane.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def model_infer(self, data: memoryview) -> list[bytes]:
        """A serialized ModelInferRequest in, a serialized ModelInferResponse out (kiln.runtime.grpc_wire)."""
        start = time.perf_counter()
        self.inflight.inc()
        code = OK
        try:
            plan = self.plan(data)
            header, chunks = await self.plane.call(
                plan.tensors(data),
                plan.rows,
                lambda outputs: plan.answer(outputs, self.plane.encode, response_header),
            )
        except KilnError as exc:
            error = status_of(exc)
            code = error.code
            raise error from exc
        except Exception as exc:  # the model raised: INTERNAL naming it, counted, and the server keeps serving
            log.exception("model %s failed on a request", self.plane.name)
            code = INTERNAL
            raise GrpcError(INTERNAL, str(ModelFailed.of(self.plane.name, exc))) from exc
        finally:
            self.inflight.dec()
            self._count(code).inc()
            self.latency.observe(time.perf_counter() - start)
        return [header, *(raw_output(chunk) for chunk in chunks)]

    def plan(self, data: memoryview) -> Plan:
        """The request's plan: kept from an earlier request with the same fields and raw inputs where this one's
        lie, or made (and kept) now."""
        rest, raws = split_request(data)
        if raws:
            self.starts[len(data)] = raws[0][0]
        key = plan_key(rest, raws)
        if (plan := self.plans.get(key, len(data))) is not None:
            return plan
        try:
            message = pb.ModelInferRequest.FromString(rest)
        except DecodeError as exc:
            raise InvalidInput(f"the request is not a valid ModelInferRequest: {exc}") from exc
        self.plane.check_name(message.model_name)
        request = to_request(message, len(raws))
        layout = {tensor.name: span for tensor, span in zip(message.inputs, raws, strict=False)}
        plan = self.plane.plan(request, layout, len(data))
        self.plans.keep(key, plan)
        return plan

    def aligned_at(self, size: int) -> int:
        """Where a request of this size had its first raw input last time: its tensors can then be used in place."""
        return self.starts.get(size, 0)

    def _count(self, code: int) -> Any:
        if code not in self.codes:
            self.codes[code] = self.metrics.requests.labels(self.plane.name, f"grpc-{CODE_NAMES.get(code, code)}")
        return self.codes[code]

    def methods(self) -> dict[str, Method]:
        calls: dict[str, tuple[type[Any], Callable[[Any], Message]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
        }
        methods = {f"/{SERVICE}/{name}": unary(kind, fn) for name, (kind, fn) in calls.items()}
        # ModelInfer takes and gives bytes: kiln.runtime.grpc_wire finds the tensors in them without a parse
        methods[f"/{SERVICE}/ModelInfer"] = Method(self.model_infer, self.aligned_at)
        return methods


async def start(
    plane: DataPlane, metrics: Metrics, host: str, port: int, max_bytes: int, arena: Arena | None = None
) -> GrpcServer:
    """A gRPC server of the six methods on host:port, started; port 0: it serves only the connections it
    adopts (an intake process's, which the model process accepts). Messages are bounded as HTTP bodies are
    (--max-body-bytes): a larger one is RESOURCE_EXHAUSTED. In an intake process request messages are read
    into `arena`, where the model process reads their tensors."""
    server = GrpcServer(InferenceService(plane, metrics).methods(), max_bytes, arena)
    if port:
        await server.listen(host, port)
        log.info("gRPC (Open Inference Protocol v2) on %s:%d", host, port)
    return server
