#!/usr/bin/env bash
# Regenerates kiln.runtime.oip_v2_pb2 (messages only: the service is registered by hand in
# kiln.runtime.grpc_service) from oip_v2.proto. Needs grpcio-tools:
#   pip install 'grpcio-tools==1.74.*' && bash runtime/oip_v2.sh
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. oip_v2.proto
