#!/usr/bin/env bash
# One prepared run for a CUDA machine (written for one H200; its python3 has torch, onnx and
# onnxruntime but no gradio, playwright or tritonclient, and no internet). From the repo root:
#
#     benchmarks/gpu.sh            # tests on CUDA, then the training benchmark
#     EPOCHS=5 benchmarks/gpu.sh   # more epochs per model (default 3)
#     RECIPE_EPOCHS=100 benchmarks/gpu.sh   # longer recipe comparison (default 30)
#
# 1. The test suite, with every fixture training on the GPU (device "auto" picks CUDA); test
#    files that need a package the machine lacks are skipped, as are browser/container tests.
# 2. The original recipe's scale: the built-in generator at 220 images per class (1,100 images,
#    880 train / 220 val), 224 px, batch 50, bf16 autocast + channels_last (what the trainer
#    uses on CUDA), all three models for $EPOCHS epochs with python -m training.run; then
#    the original against the improved recipe (benchmarks/recipes.py, $RECIPE_EPOCHS epochs each)
#    and benchmarks/train.py on the same data (real loader vs batches already on the GPU).
# Prints images/s per model and the estimated time of the full experiment (3 models x 30
# epochs), and leaves logs and JSON in $OUT (or /tmp/gpu-bench).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-bench}
EPOCHS=${EPOCHS:-3}
RECIPE_EPOCHS=${RECIPE_EPOCHS:-30}  # benchmarks.recipes: both recipes this many epochs
export RESNET_TRIO_CACHE="${RESNET_TRIO_CACHE:-$OUT/cache}"
WORK=$(mktemp -d /tmp/gpu-work.XXXXXX)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF' || exit 1
import torch, onnxruntime
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"onnxruntime {onnxruntime.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.cuda.get_device_name(0), f"bf16: {torch.cuda.is_bf16_supported()}")
EOF

echo "== 1. test suite on CUDA"
ignore=()
for module in gradio gradio_client playwright tritonclient; do
  if ! $PY -c "import $module" 2>/dev/null; then
    for f in $(grep -l "$module" tests/test_*.py); do ignore+=(--ignore "$f"); done
  fi
done
[ ${#ignore[@]} -gt 0 ] && echo "skipping (missing packages): ${ignore[*]}"
$PY -m pytest -q -p no:cacheprovider -m "not browser and not container" "${ignore[@]}" tests \
  2>&1 | tee "$OUT/tests.log" || status=1

echo "== 2. training at the original recipe's scale ($EPOCHS epochs per model)"
$PY - "$WORK/data" <<'EOF' || exit 1
import sys, time
from pathlib import Path
from training.synthetic import generate
started = time.perf_counter()
generate(Path(sys.argv[1]), images_per_class=220)
print(f"generated 1,100 images in {time.perf_counter() - started:.1f}s")
EOF
started=$(date +%s.%N)
$PY -m training.run --data "$WORK/data" --image-size 224 --batch-size 50 --epochs "$EPOCHS" \
  --out "$WORK/run" 2>&1 | tee "$OUT/train.log" || status=1
ended=$(date +%s.%N)
$PY - "$WORK/run" "$started" "$ended" <<'EOF' | tee "$OUT/train-summary.txt" || status=1
import csv, json, sys
from pathlib import Path
run, started, ended = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
splits = json.loads((run / "splits.json").read_text())
train_images = len(splits["train"])
total_epoch_s, rows = 0.0, []
for model in ("plain34", "resnet34", "resnet34_modified"):
    history = list(csv.DictReader(open(run / model / "history.csv")))
    seconds = [float(h["seconds"]) for h in history]
    steady = seconds[1:] or seconds  # the first epoch includes cuDNN autotuning
    epoch_s = sum(steady) / len(steady)
    total_epoch_s += epoch_s
    rows.append(f"{model:18s} epoch {epoch_s:6.2f}s (train + validation), "
                f"{train_images / epoch_s:7.0f} train images/s, first epoch {seconds[0]:.2f}s")
wall = ended - started
overhead = wall - sum(sum(float(h["seconds"]) for h in csv.DictReader(open(run / m / "history.csv")))
                      for m in ("plain34", "resnet34", "resnet34_modified"))
print("\n".join(rows))
print(f"this run: {wall:.1f}s wall for {len(seconds)} epochs x 3 models "
      f"({overhead:.1f}s outside the epochs: start-up, decoding, reports)")
estimate = 30 * total_epoch_s + overhead
print(f"estimate for 3 models x 30 epochs: {estimate:.0f}s ({estimate / 60:.1f} min; target < 3 min)")
EOF

echo "== 3. both recipes on the same data, split and epochs (benchmarks/recipes.py; the cache is warm)"
$PY -m benchmarks.recipes --data "$WORK/data" --image-size 224 --epochs "$RECIPE_EPOCHS" \
  --models plain34,resnet34,resnet34_modified --out "$OUT/recipes.json" \
  2>&1 | tee "$OUT/recipes.log" || status=1

echo "== 4. input pipeline vs batches in GPU memory (benchmarks/train.py)"
$PY -m benchmarks.train --data "$WORK/data" --models plain34,resnet34,resnet34_modified \
  --image-size 224 --batch-size 50 --rounds 2 --device cuda --out "$OUT/train.json" \
  2>&1 | tee "$OUT/train-benchmark.log" || status=1

rm -rf "$WORK"
echo "== done (status $status); logs in $OUT"
exit $status
