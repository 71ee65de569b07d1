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
label. Every intake process serves the port (gRPC listens with SO_REUSEPORT, so the kernel spreads
connections over them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from kiln import __version__
from kiln.runtime import oip_v2_pb2 as pb
from kiln.runtime.dataplane import DataPlane
from kiln.runtime.errors import InvalidInput, KilnError, ModelFailed, ModelNotFound, NotReady, Overloaded
from kiln.runtime.grpc_wire import plan_key, raw_output, split_request
from kiln.runtime.metrics import Metrics
from kiln.runtime.plans import Plan, Plans
from kiln.runtime.protocol import InferenceRequest, InferenceResponse, RequestInput, RequestOutput

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
CODES: dict[type[KilnError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
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


class InferenceService:
    """The six methods, over a dataplane (the model's own, or an intake's that forwards to it)."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane, self.metrics = plane, metrics
        self.plans = Plans()
        self.codes: dict[grpc.StatusCode, Any] = {}  # prometheus label children, resolved once per code
        self.inflight, self.latency = metrics.inflight.labels(plane.name), metrics.latency.labels(plane.name)

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.reports_ready)

    async def model_ready(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Message:
        await self.named(request.name, context)
        return pb.ModelReadyResponse(ready=self.plane.reports_ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="kiln", version=__version__, extensions=[])

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Message:
        await self.named(request.name, context)
        try:
            meta = self.plane.metadata()
        except KilnError as exc:
            await self.abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def model_infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """A serialized ModelInferRequest in, a serialized ModelInferResponse out (kiln.runtime.grpc_wire)."""
        start = time.perf_counter()
        self.inflight.inc()
        code = grpc.StatusCode.OK
        try:
            plan = self.plan(data)
            header, chunks = await self.plane.call(
                plan.tensors(memoryview(data)),
                plan.rows,
                lambda outputs: plan.answer(outputs, self.plane.encode, response_header),
            )
        except KilnError as exc:
            code = self.code(exc)
            await self.abort(context, exc)
        except Exception as exc:  # the model raised: INTERNAL naming it, counted, and the server keeps serving
            log.exception("model %s failed on a request", self.plane.name)
            code = grpc.StatusCode.INTERNAL
            await self.abort(context, ModelFailed.of(self.plane.name, exc))
        finally:
            self.inflight.dec()
            self._count(code).inc()
            self.latency.observe(time.perf_counter() - start)
        return header + b"".join(raw_output(chunk) for chunk in chunks)

    def plan(self, data: bytes) -> Plan:
        """The request's plan: kept from an earlier request with the same fields and raw inputs where this one's
        lie, or made (and kept) now."""
        rest, raws = split_request(data)
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

    def _count(self, code: grpc.StatusCode) -> Any:
        if code not in self.codes:
            self.codes[code] = self.metrics.requests.labels(self.plane.name, f"grpc-{code.name}")
        return self.codes[code]

    async def named(self, name: str, context: grpc.aio.ServicerContext) -> None:
        try:
            self.plane.check_name(name)
        except KilnError as exc:
            await self.abort(context, exc)

    @staticmethod
    def code(exc: KilnError) -> grpc.StatusCode:
        return next((c for t, c in CODES.items() if isinstance(exc, t)), grpc.StatusCode.INTERNAL)

    async def abort(self, context: grpc.aio.ServicerContext, exc: KilnError) -> None:
        await context.abort(self.code(exc), str(exc))

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Callable[..., Awaitable[Message]], type[Message]]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=kind.FromString, response_serializer=lambda m: m.SerializeToString()
            )
            for name, (fn, kind) in methods.items()
        }
        # ModelInfer takes and gives bytes: kiln.runtime.grpc_wire finds the tensors in them without a parse
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start(plane: DataPlane, metrics: Metrics, host: str, port: int, max_bytes: int) -> grpc.aio.Server:
    """A gRPC server of the six methods on host:port, started (it shares the port with the other intakes).
    Messages are bounded as HTTP bodies are (--max-body-bytes): a larger one is RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 1),
        ]
    )
    server.add_generic_rpc_handlers((InferenceService(plane, metrics).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) on %s", address)
    return server
