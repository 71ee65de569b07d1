#!/usr/bin/env bash
# Profiles kiln-serve under load with py-spy (on the GPU machine: after bench/gpu.sh has
# installed the wheels and compiled resnet50). Prints the CPU cores each part used (model
# process, intake processes, load generator) and where the model process and one intake spend time.
#   MODELS=resnet50 MODES=aot SKIP_SERVING=1 bash bench/gpu.sh && CONCURRENCY=64 bash bench/profile_serving.sh
# PROTOCOL=grpc loads the gRPC port instead (with kiln-loadgen: KILN_LOADGEN, as bench/gpu.sh sets it), and the
# intake's profile then has native frames (grpc's C core): py-spy pauses it to sample, so its rate drops.
set -euo pipefail
pkg=/tmp/kp; out=${OUT:-/tmp/out}
export PYTHONPATH=$pkg:/tmp/site PYTHONUNBUFFERED=1
export LD_PRELOAD=$(readlink -f "$(g++ -print-file-name=libstdc++.so.6)")  # see bench/gpu.sh
cd $pkg
art=$(ls -d /var/tmp/kiln-bench/cache-resnet50/*/ | head -n 1)
python3 -P -m kiln.runtime.serve --artifact "$art" --model-name resnet50 --device cuda --host 127.0.0.1 --port 18555 \
  --max-batch-size 64 --max-delay-ms 1 --intake-processes "${INTAKES:--1}" --grpc-port 18556 > "$out/serve-profile.log" 2>&1 &
server=$!
for _ in $(seq 300); do curl -sf 127.0.0.1:18555/v2/health/ready >/dev/null && break; sleep 0.2; done
CONCURRENCY=${CONCURRENCY:-64} python3 - <<'PY' &
import os
from bench import models
from bench.client import GRPC_INFER, encode, go_load
from bench.serving import answers, load
c = int(os.environ["CONCURRENCY"])
if os.environ.get("PROTOCOL") == "grpc":
    print(go_load(18556, GRPC_INFER, answers("resnet50", "cuda", 8, grpc=True), c, 20, protocol="grpc"))
else:
    body, headers = encode(models.names("resnet50"), [t.numpy() for t in models.inputs("resnet50", 1)])
    print(load(18555, "resnet50", body, headers, c, 20))
PY
load=$!
sleep 8  # the load generator's imports (and, for gRPC, eager answers to check against)
intake=$(cat /proc/$server/task/$server/children | awk '{print $1}')
spy() {  # pid, output, extra py-spy arguments (--native: it samples with the process paused)
  local mode=--nonblocking; [ -n "${3:-}" ] && mode=$3
  /tmp/site/bin/py-spy record -p "$1" -d 8 -r 200 -f raw -t --idle $mode -o "$2" > "$2.log" 2>&1
}
spy $server "$out/profile.txt" &
native=; [ "${PROTOCOL:-http}" = grpc ] && native=--native
[ -n "$intake" ] && spy "$intake" "$out/profile-intake.txt" $native &
python3 - $server $load <<'PY'
import os, sys, time
def tree(pid):
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in open(f"/proc/{pid}/task/{task}/children").read().split():
            out += tree(int(child))
    return out
def cpu(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
server, load = map(int, sys.argv[1:])
parts = {"model process": [server], "intake processes": tree(server)[1:], "load generator": tree(load)}
def host():  # (busy, all) clock ticks of every core: what the whole machine did, sandbox included
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)
def threads(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        out[int(tid)] = cpu(f"{pid}/task/{tid}")
    return out
before = {k: sum(cpu(p) for p in v) for k, v in parts.items()}
host0, threads0 = host(), threads(server)
time.sleep(8)
print("CPU cores used over 8 s:", {k: round((sum(cpu(p) for p in parts[k]) - before[k]) / 8, 2) for k in parts})
host1, threads1 = host(), threads(server)
cores = os.cpu_count()
print(f"whole machine: {cores * (host1[0] - host0[0]) / max(1, host1[1] - host0[1]):.2f} of {cores} cores busy")
busiest = sorted(((threads1[t] - threads0.get(t, 0)) / 8, t) for t in threads1)[::-1][:6]
print("model process's busiest threads (cores):", [(t, round(c, 2)) for c, t in busiest])
PY
wait $load || true
kill $server
for f in "$out/profile.txt" "$out/profile-intake.txt"; do
[ -f "$f" ] || continue
echo "== $f"
python3 - "$f" <<'PY'
import sys
from collections import Counter
own, threads, total = Counter(), Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    frames = stack.split(";")
    total += int(n)
    own[frames[-1][:160]] += int(n)
    threads[frames[0][:60]] += int(n)
print("threads:", {k: f"{100*v/total:.0f}%" for k, v in threads.most_common(6)})
for frame, n in own.most_common(25):
    print(f"{100*n/total:5.1f}% {frame}")
PY
done
