"""kiln-serve's gRPC port (Open Inference Protocol v2) with Triton's client and with plain grpcio:
answers equal eager PyTorch and the HTTP path's, errors are the gRPC statuses that mean the same."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from examples import models
from kiln.devcluster.cluster import free_port
from kiln.runtime import oip_v2_pb2 as pb
from tests.support.serving import Artifact, Server, infer_json, outputs_of

SERVICE = "/inference.GRPCInferenceService/"


def serve_grpc(compiled: dict[str, Artifact], serve, *extra: str) -> tuple[Server, str]:  # type: ignore[no-untyped-def]
    port = free_port()
    server = serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", f"--grpc-port={port}", *extra)
    return server, f"127.0.0.1:{port}"


@contextlib.contextmanager
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


def call(ch: grpc.Channel, method: str, request: object, reply: type) -> object:
    stub = ch.unary_unary(
        SERVICE + method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=reply.FromString
    )
    return stub(request, timeout=30)


@pytest.mark.parametrize("intakes", [0, 2], ids=["one process", "two intake processes"])
def test_tritonclient_grpc_infers_as_eager_and_as_http(compiled: dict[str, Artifact], serve, intakes: int) -> None:  # type: ignore[no-untyped-def]
    server, address = serve_grpc(compiled, serve, f"--intake-processes={intakes}")
    x, y = models.examples("mlp", 5, seed=11)
    want = models.eager("mlp", x, y)
    over_http = outputs_of(infer_json(server, "mlp", (x, y), ["x", "y"]))
    with contextlib.closing(triton.InferenceServerClient(address)) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
        assert client.get_server_metadata().name == "kiln"
        meta = client.get_model_metadata("mlp")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 16]),
            ("y", "FP32", [-1, 4]),
        ]
        inputs = [triton.InferInput("x", [5, 16], "FP32"), triton.InferInput("y", [5, 4], "FP32")]
        inputs[0].set_data_from_numpy(x.numpy())
        inputs[1].set_data_from_numpy(y.numpy())
        result = client.infer("mlp", inputs, outputs=[triton.InferRequestedOutput("output1")])
        assert result.get_output("output0") is None  # only what was asked for
        got = result.as_numpy("output1")
        np.testing.assert_allclose(got, want[1].numpy(), atol=1e-4, rtol=1e-3)
        np.testing.assert_array_equal(got, over_http[1].numpy())  # the same dataplane: the same bytes
        with pytest.raises(InferenceServerException, match="has shape \\[5, 15\\], expected \\[-1, 16\\]"):
            bad = [triton.InferInput("x", [5, 15], "FP32"), inputs[1]]
            bad[0].set_data_from_numpy(np.zeros((5, 15), np.float32))
            client.infer("mlp", bad)
    assert server.metric('kiln_requests_total{model="mlp",status="grpc-OK"}') == 1.0


def test_plain_grpcio_with_typed_contents_and_clear_errors(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    _, address = serve_grpc(compiled, serve)
    x, y = models.examples("mlp", 3, seed=4)
    want = models.eager("mlp", x, y)
    tensor = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(
        model_name="mlp",
        id="r-1",
        inputs=[
            tensor(
                name="x",
                datatype="FP32",
                shape=[3, 16],
                contents=pb.InferTensorContents(fp32_contents=x.flatten().tolist()),
            ),
            tensor(
                name="y",
                datatype="FP32",
                shape=[3, 4],
                contents=pb.InferTensorContents(fp32_contents=y.flatten().tolist()),
            ),
        ],
    )
    with channel(address) as ch:
        assert call(ch, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live  # type: ignore[attr-defined]
        reply = call(ch, "ModelInfer", request, pb.ModelInferResponse)
        assert reply.id == "r-1" and [o.name for o in reply.outputs] == ["output0", "output1"]  # type: ignore[attr-defined]
        for out, raw, expected in zip(reply.outputs, reply.raw_output_contents, want, strict=True):  # type: ignore[attr-defined]
            got = torch.from_numpy(np.frombuffer(raw, np.float32).reshape(list(out.shape)).copy())
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)

        with pytest.raises(grpc.RpcError) as missing:
            call(ch, "ModelReady", pb.ModelReadyRequest(name="other"), pb.ModelReadyResponse)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        short = pb.ModelInferRequest(model_name="mlp", inputs=request.inputs, raw_input_contents=[b"\0" * 4])
        with pytest.raises(grpc.RpcError) as bad:
            call(ch, "ModelInfer", short, pb.ModelInferResponse)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "1 raw_input_contents for 2 inputs" in bad.value.details()  # type: ignore[attr-defined]
        wrong = pb.ModelInferRequest(model_name="mlp", inputs=[request.inputs[0]])
        with pytest.raises(grpc.RpcError) as partial:
            call(ch, "ModelInfer", wrong, pb.ModelInferResponse)
        assert "inputs must be exactly x (FP32 [-1, 16]), y (FP32 [-1, 4])" in partial.value.details()  # type: ignore[attr-defined]
