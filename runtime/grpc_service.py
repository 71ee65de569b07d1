"""The Open Inference Protocol v2 over gRPC: the same dataplane as HTTP, on its own port.

Serve path, requests (beside kiln.runtime.inference, no HTTP). Triton's and KServe's clients
(`tritonclient.grpc`, KServe's `grpc_predict_v2.proto`) call ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata and ModelInfer; inputs come as `raw_input_contents` (little-endian
bytes, one entry per input) or typed `contents`, and outputs always go back as
`raw_output_contents`, as Triton answers. A request is checked, batched and answered by the
dataplane exactly as over HTTP; a domain error becomes the gRPC status that means the same
(a bad shape is INVALID_ARGUMENT naming the expected one, a full queue UNAVAILABLE), counted in
the same metrics with the status name as its label. Every intake process serves the port
(gRPC listens with SO_REUSEPORT, so the kernel spreads connections over them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from kiln import __version__
from kiln.runtime import oip_v2_pb2 as pb
from kiln.runtime.dataplane import DataPlane
from kiln.runtime.errors import InvalidInput, KilnError, ModelFailed, ModelNotFound, NotReady, Overloaded
from kiln.runtime.metrics import Metrics
from kiln.runtime.protocol import InferenceRequest, RequestInput, RequestOutput

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


def to_request(message: pb.ModelInferRequest) -> tuple[InferenceRequest, dict[str, bytes]]:
    """The protocol's request model and raw bytes per input: what the HTTP path hands the dataplane."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send one per input")
    inputs, binary = [], {}
    for index, tensor in enumerate(message.inputs):
        data = None
        if raw:
            binary[tensor.name] = raw[index]
        else:
            field = CONTENTS.get(tensor.datatype)
            data = list(getattr(tensor.contents, field)) if field else None
        inputs.append(
            RequestInput(
                name=tensor.name,
                shape=list(tensor.shape),
                datatype=tensor.datatype,
                parameters={k: parameter(v) for k, v in tensor.parameters.items()} or None,
                data=data,
            )
        )
    outputs = [RequestOutput(name=o.name, parameters={"binary_data": True}) for o in message.outputs]
    request = InferenceRequest(
        id=message.id or None,
        parameters={"binary_data_output": True},  # raw_output_contents, always
        inputs=inputs,
        outputs=outputs or None,
    )
    return request, binary


class InferenceService:
    """The six methods, over a dataplane (the model's own, or an intake's that forwards to it)."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane, self.metrics = plane, metrics

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

    async def model_infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Message:
        start = time.perf_counter()
        inflight = self.metrics.inflight.labels(self.plane.name)
        inflight.inc()
        code = grpc.StatusCode.OK
        try:
            self.plane.check_name(request.model_name)
            parsed, binary = to_request(request)
            result, chunks = await self.plane.infer(parsed, binary)
        except KilnError as exc:
            code = self.code(exc)
            await self.abort(context, exc)
        except Exception as exc:  # the model raised: INTERNAL naming it, counted, and the server keeps serving
            log.exception("model %s failed on a request", self.plane.name)
            code = grpc.StatusCode.INTERNAL
            await self.abort(context, ModelFailed.of(self.plane.name, exc))
        finally:
            inflight.dec()
            self.metrics.requests.labels(self.plane.name, f"grpc-{code.name}").inc()
            self.metrics.latency.labels(self.plane.name).observe(time.perf_counter() - start)
        tensor = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=result.model_name,
            model_version=result.model_version or "",
            id=result.id or "",
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in result.outputs],
            raw_output_contents=chunks,
        )

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
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    fn, request_deserializer=kind.FromString, response_serializer=lambda m: m.SerializeToString()
                )
                for name, (fn, kind) in methods.items()
            },
        )


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
