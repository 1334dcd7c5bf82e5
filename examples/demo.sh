#!/usr/bin/env bash
# The main job end to end on the built-in synthetic scenes, on CPU:
# convert -> train (both stages) -> profile -> calibrate for <= 1 mIoU point drop on measured latency
# -> eval on held-out data -> bench (measured beside predicted speed-up) -> serve and load-test it.
set -euo pipefail
OUT=${DEMO_DIR:-out/demo}
DATA="synthetic:scenes?classes=8&size=128&n=400&n_eval=300"   # 300 images each in calib and test
MODEL=torchvision.models.segmentation:lraspp_mobilenet_v3_large
rm -rf "$OUT" && mkdir -p "$OUT"
BUNDLE="$OUT/lraspp.mex"

echo "== 1/7 convert: $MODEL -> $BUNDLE"
mexify convert "$MODEL" --arg num_classes=8 --arg weights=null --arg weights_backbone=null \
    --input-size 128x128 --exits 6 -o "$BUNDLE"

echo "== 2/7 train: stage 1 end-to-end, stage 2 frozen backbone + positive filtering distillation"
mexify train "$BUNDLE" --data "$DATA" --recipe demo-synthetic

echo "== 3/7 profile: every stage, head, decision and mask timed on this CPU (the calibration's cost)"
mexify profile "$BUNDLE" --device cpu --batch-size 1,8

echo "== 4/7 calibrate: fastest entropy policy within 1 mIoU point of the final exit, on measured latency"
mexify calibrate "$BUNDLE" --data "$DATA" --split calib --policy entropy --max-drop 1.0 --device cpu || [ $? -eq 3 ]

echo "== 5/7 eval on the held-out test split"
mexify eval "$BUNDLE" --data "$DATA" --split test --device cpu

echo "== 6/7 bench: measured latency and speed-up on CPU, beside the predicted one"
mexify bench "$BUNDLE" --data "$DATA" --split test --limit 100 --device cpu

echo "== 7/7 serve: the bundle over HTTP (batched across stages) beside the original served the same way; open-loop load on both"
PORT=${DEMO_PORT:-8765}
mexify serve "$BUNDLE" --port "$PORT" --threads 1 & SERVICE=$!
mexify serve "$BUNDLE" --port $((PORT + 1)) --threads 1 --original & ORIGINAL=$!
trap 'kill $SERVICE $ORIGINAL 2>/dev/null || true' EXIT
mexify loadtest "http://127.0.0.1:$PORT" --baseline "http://127.0.0.1:$((PORT + 1))" --rate 40 --requests 200 --wait 120
kill -TERM $SERVICE $ORIGINAL && wait $SERVICE $ORIGINAL   # SIGTERM drains: every accepted request is answered
