#!/usr/bin/env bash
# The main job end to end on the built-in digits, from a fresh machine:
# set up -> train (small preset) -> evaluate -> generate bundles for the host CPU and a Jetson
# -> benchmark -> sample. A finished runs/digits is reused (delete it to retrain).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PE=.venv/bin/projectable-edge
TASK=${TASK:-3}
if [ ! -f runs/digits/model.safetensors ]; then
  $PE train --dataset digits --preset small --out runs/digits
fi
$PE evaluate runs/digits --plot runs/digits/bits_per_task.png
$PE generate --task "$TASK" --target x86-64-cpu --source runs/digits --overwrite
$PE generate --task "$TASK" --target jetson --source runs/digits --overwrite
$PE benchmark "bundles/${TASK}__x86-64-cpu" --histogram "runs/digits/latency_task${TASK}.png"
$PE sample "bundles/${TASK}__jetson-orin-nano" -n 16 --out "runs/digits/samples_task${TASK}.png"
echo "done: see bundles/ (report.md in each) and runs/digits/*.png"
