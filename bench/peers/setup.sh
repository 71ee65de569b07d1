#!/usr/bin/env bash
# A venv with TorchServe and BentoML for bench/peers, beside Kiln's (never mixed into it: their
# pins differ). torch and torchvision come from Kiln's venv through a .pth file at the end of
# sys.path, so the peers run the very same torch build and no second multi-GB wheel is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
KILN_VENV=$(bash .ci/setup | tail -n 1)
PEERS=${KILN_PEERS_VENV:-$HOME/.cache/kiln/peers}
[ -x "$PEERS/bin/python" ] || python3.11 -m venv "$PEERS"
"$PEERS/bin/pip" install -q torchserve==0.12.0 torch-model-archiver==0.12.0 bentoml==1.4.39
site=$("$KILN_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
peer_site=$("$PEERS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$peer_site/zz-kiln-torch.pth"
"$KILN_VENV/bin/pip" install -q torchvision==0.26.0  # ResNet-50 for the benchmarks
echo "$PEERS"
