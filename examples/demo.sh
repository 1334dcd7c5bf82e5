#!/usr/bin/env bash
# The main job end to end on the built-in synthetic scenes, on CPU:
# convert -> train (both stages) -> calibrate for <= 1 mIoU point drop -> eval on held-out data -> bench.
set -euo pipefail
OUT=${DEMO_DIR:-out/demo}
DATA="synthetic:scenes?classes=8&size=128&n=400"
MODEL=torchvision.models.segmentation:lraspp_mobilenet_v3_large
rm -rf "$OUT" && mkdir -p "$OUT"
BUNDLE="$OUT/lraspp.mex"

echo "== 1/5 convert: $MODEL -> $BUNDLE"
mexify convert "$MODEL" --arg num_classes=8 --arg weights=null --arg weights_backbone=null \
    --input-size 128x128 --exits 6 -o "$BUNDLE"

echo "== 2/5 train: stage 1 end-to-end, stage 2 frozen backbone + positive filtering distillation"
mexify train "$BUNDLE" --data "$DATA" --recipe quick-synthetic

echo "== 3/5 calibrate: fastest mess policy within 1 mIoU point of the final exit"
mexify calibrate "$BUNDLE" --data "$DATA" --split calib --policy mess --max-drop 1.0 || [ $? -eq 3 ]

echo "== 4/5 eval on the held-out test split"
mexify eval "$BUNDLE" --data "$DATA" --split test

echo "== 5/5 bench: measured latency and speed-up on CPU"
mexify bench "$BUNDLE" --data "$DATA" --split test
