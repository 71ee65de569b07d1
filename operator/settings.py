"""Operator settings, from KILN_* environment variables (the Helm chart sets them).

Operator core: pydantic-settings, parsed once in main().
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", frozen=True)

    runtime_image: Annotated[
        str, Field(description="Image of kiln-compile and kiln-serve; part of every cache key.")
    ] = "ghcr.io/kiln-dev/kiln-runtime:0.1.0"
    gpu_label: Annotated[str, Field(description="Node label naming the GPU product (GPU feature discovery's).")] = (
        "nvidia.com/gpu.product"
    )
    gpu_resource: Annotated[str, Field(description="Extended resource a GPU pod asks for.")] = "nvidia.com/gpu"
    cache_claim: Annotated[str, Field(description="PVC holding the artifact cache, per namespace.")] = "kiln-cache"
    cache_create: Annotated[bool, Field(description="Create the cache PVC in a model's namespace when missing.")] = True
    cache_size: Annotated[str, Field(description="Size of a cache PVC the operator creates.")] = "20Gi"
    cache_storage_class: Annotated[str, Field(description="Storage class of that PVC ('' = cluster default).")] = ""
    cache_access_mode: Annotated[str, Field(description="Access mode of that PVC.")] = "ReadWriteMany"
    compile_backoff_limit: Annotated[int, Field(ge=0, description="Retries of a failed compile pod.")] = 1
    compile_deadline_seconds: Annotated[int, Field(ge=60, description="activeDeadlineSeconds of a compile Job.")] = 3600
    compile_ttl_seconds: Annotated[int, Field(ge=0, description="ttlSecondsAfterFinished of a compile Job.")] = 3600
    compile_cpu: Annotated[str, Field(description="CPU request of a compile pod.")] = "1"
    compile_memory: Annotated[str, Field(description="Memory request of a compile pod.")] = "2Gi"
    node_lost_seconds: Annotated[
        int,
        Field(
            ge=0,
            description="How long serving pods stay bound to a node that stopped reporting before Kubernetes "
            "evicts and replaces them (their NoExecute tolerations; Kubernetes' default is 300).",
        ),
    ] = 60
    max_rebuilds: Annotated[
        int, Field(ge=0, description="Compiles again after serving pods find an artifact corrupt, before Failed.")
    ] = 3
    artifact_gc_grace_seconds: Annotated[
        int, Field(ge=0, description="How long an artifact no TorchModel uses is kept before it and its files go.")
    ] = 3600
    resync_seconds: Annotated[float, Field(gt=0, description="How often every resource is reconciled again.")] = 5.0
    serve_port: Annotated[int, Field(description="Port of kiln-serve in pods and Services.")] = 8080
    grpc_port: Annotated[
        int, Field(description="Port of kiln-serve's gRPC service (Open Inference Protocol v2), named grpc.")
    ] = 8081
    run_as_user: Annotated[int, Field(description="Non-root UID of compile and serving pods.")] = 65532
    cluster_domain: Annotated[str, Field(description="Cluster DNS domain used in status URLs.")] = "cluster.local"
