#!/usr/bin/env bash
# The main job on the embedded default model: set up, split ResNet-18 (224x224) across two
# host devices, run the pieces and check them against ONNX Runtime on the whole model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL=${MODEL:-resnet18}
STRATEGY=${STRATEGY:-pipeline}
DEVICES=${DEVICES:-host,host}
OUT=${OUT:-out/$MODEL-$STRATEGY}
.venv/bin/splitc compile "$MODEL" -o "$OUT" --devices "$DEVICES" --strategy "$STRATEGY"
.venv/bin/splitc inspect "$OUT"
.venv/bin/splitc run "$OUT" --check --output "$OUT/output.npy"
