#!/usr/bin/env bash
# Runs the GPU benchmarks on the lent device machine (no network there): installs the
# carried wheels, assembles the kiln package outside the repo root (a repo root on
# sys.path would shadow the standard library's `operator`), and runs both benchmarks.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
pkg=/tmp/kp && rm -rf $pkg && mkdir -p $pkg
cp -r common $pkg/kiln && for p in operator runtime devcluster; do cp -r $p $pkg/kiln/$p; done
cp -r bench examples $pkg/
export PYTHONPATH=$pkg:/tmp/site PYTHONUNBUFFERED=1
# shared/notes/gpu-findings.md: AOTInductor libraries need the system libstdc++ there.
export LD_PRELOAD=$(readlink -f "$(g++ -print-file-name=libstdc++.so.6)")
out=${OUT:-/tmp/out}
# `SERVING_ARGS="--client go"` needs kiln-loadgen (the device has no Go): build it here and carry it in .whl,
#   cp "$(bash bench/run.sh client_build)" .whl/kiln-loadgen
[ -x .whl/kiln-loadgen ] && export KILN_LOADGEN=$PWD/.whl/kiln-loadgen
cd $pkg
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "${LEAN_CHECK:-}" ]; then python3 -m bench.lean_check --device cuda 2>&1 | tee "$out/lean-check.log"; fi
[ -n "${ONLY_CHECK:-}" ] && exit 0
if [ -n "${SEQLEN:-}" ]; then  # BERT-base, mixed sequence lengths: dynamic vs fixed-length artifact
  python3 -m bench.seqlen --device cuda --concurrency "${SEQLEN_C:-1,16,64}" --batch-max 64 --seconds "${SECONDS_EACH:-10}" --out "$out/seqlen-cuda.json" 2>&1 | tee "$out/seqlen.log"
  exit 0
fi
python3 -m bench.coldstart --batch-max "${BATCH_MAX:-32}" --models "${MODELS:-mlp,resnet50,bert}" --modes "${MODES:-eager,jit-cold,jit-warm,aot-package,aot-runner,aot}" --rounds "${ROUNDS:-1}" --device cuda --out "$out/coldstart-cuda.json" 2>&1 | tee "$out/coldstart.log"
artifact() { python3 -c "import json; print(json.load(open('$out/coldstart-cuda.json'))['results']['$1']['compile']['path'])"; }
for probe in ${PROBES:-}; do  # e.g. PROBES="first_calls graph_probe", for each of PROBE_MODELS
  for serve in $(echo "${PROBE_MODELS:-resnet50}" | tr , ' '); do
    python3 -m "bench.$probe" --model "$serve" --artifact "$(artifact "$serve")" --out "$out/$probe-$serve.json" 2>&1 | tee "$out/$probe-$serve.log"
  done
done
[ -n "${SKIP_SERVING:-}" ] && exit 0
for serve in $(echo "${SERVE_MODEL:-resnet50}" | tr , ' '); do
  art=$(artifact "$serve")
  python3 -m bench.serving --model "$serve" --device cuda --artifact "$art" --out "$out/serving-cuda-$serve.json" ${SERVING_ARGS:-} 2>&1 | tee "$out/serving-$serve.log"
done
