#!/bin/bash
# Hashes of six small CPU runs of a checkout: train, the same train stopped halfway and resumed, random
# box and free-form holes, eval and sample; two checkouts print the same lines when a change kept what
# train, eval and sample compute (a minute each, where make train then make eval take about twelve).
#
#     bash studies/restructure/fingerprint.sh CHECKOUT [PYTHON] > fingerprint.txt
set -euo pipefail
cd "$1"
PY=${2:-.venv/bin/python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
A="--base-ch 16 --ch-mult 1,2 --batch-size 32 --panel-every 0 --seed 3"

hashes() {  # CHECKPOINT LABEL: the model, EMA and optimizer state (settings included), and the step
    $PY - "$HERE" "$@" <<'EOF'
import hashlib, sys
import torch
sys.path.insert(0, sys.argv[1])
from weights_hash import tensors_hash
c = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
state = b"".join(v.numpy().tobytes() for s in c["optimizer"]["state"].values() for v in s.values())
opt = hashlib.sha256(str(c["optimizer"]["param_groups"]).encode() + state).hexdigest()
print(sys.argv[3], "model", tensors_hash(c["model"])[:16], "ema", tensors_hash(c["ema"])[:16], "optimizer", opt[:16],
      "step", c["step"])
EOF
}

$PY ddim_inpaint.py train $A --steps 60 --ckpt-every 20 --out-dir "$W/full" > "$W/full.log" 2>&1
hashes "$W/full/last.pt" train
echo "logged $(grep -o 'loss=[0-9.]*' "$W/full.log" | tail -1)"
$PY ddim_inpaint.py train $A --steps 30 --ckpt-every 20 --out-dir "$W/half" > /dev/null 2>&1
$PY ddim_inpaint.py train $A --steps 60 --ckpt-every 20 --out-dir "$W/half" --resume > /dev/null 2>&1
hashes "$W/half/last.pt" resume
for kind in box free; do
    $PY ddim_inpaint.py train $A --steps 30 --train-mask $kind --out-dir "$W/$kind" > /dev/null 2>&1
    hashes "$W/$kind/last.pt" $kind
done
$PY ddim_inpaint.py eval --out-dir "$W/full" --n-eval 64 --num-samples 2 --results-dir "$W/results" > /dev/null 2>&1
$PY -c "import sys; sys.path.insert(0, '$HERE'); from weights_hash import metrics_hash
print('eval metrics', metrics_hash('$W/results/inpaint_metrics.json')[:16])"
$PY ddim_inpaint.py sample --out-dir "$W/full" > /dev/null 2>&1
echo "sample and panel PNGs $(cd "$W/full" && sha256sum ./*.png | cut -c1-16 | tr '\n' ' ')"
