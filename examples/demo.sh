#!/usr/bin/env bash
# The main job end to end on the built-in synthetic scenes, on CPU:
# convert -> train (both stages) -> profile -> calibrate for <= 1 mIoU point drop on measured latency
# -> eval on held-out data -> bench (measured beside predicted speed-up).
set -euo pipefail
OUT=${DEMO_DIR:-out/demo}
DATA="synthetic:scenes?classes=8&size=128&n=400&n_eval=300"   # 300 images each in calib and test
MODEL=torchvision.models.segmentation:lraspp_mobilenet_v3_large
rm -rf "$OUT" && mkdir -p "$OUT"
BUNDLE="$OUT/lraspp.mex"

echo "== 1/6 convert: $MODEL -> $BUNDLE"
mexify convert "$MODEL" --arg num_classes=8 --arg weights=null --arg weights_backbone=null \
    --input-size 128x128 --exits 6 -o "$BUNDLE"

echo "== 2/6 train: stage 1 end-to-end, stage 2 frozen backbone + positive filtering distillation"
mexify train "$BUNDLE" --data "$DATA" --recipe demo-synthetic

echo "== 3/6 profile: every stage, head, decision and mask timed on this CPU (the calibration's cost)"
mexify profile "$BUNDLE" --device cpu --batch-size 1

echo "== 4/6 calibrate: fastest entropy policy within 1 mIoU point of the final exit, on measured latency"
mexify calibrate "$BUNDLE" --data "$DATA" --split calib --policy entropy --max-drop 1.0 --device cpu || [ $? -eq 3 ]

echo "== 5/6 eval on the held-out test split"
mexify eval "$BUNDLE" --data "$DATA" --split test --device cpu

echo "== 6/6 bench: measured latency and speed-up on CPU, beside the predicted one"
mexify bench "$BUNDLE" --data "$DATA" --split test --limit 100 --device cpu
