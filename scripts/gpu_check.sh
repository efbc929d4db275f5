#!/usr/bin/env bash
# Everything a machine with a GPU should run, in one go and inside 8 minutes, with every
# figure written to one file:
#   1. the CUDA tests (they skip on a machine without one);
#   2. the TF32 / bf16 parity checks (scripts/gpu_parity.py);
#   3. both benchmarks on the device: the digits against Quantus (scripts/bench_vs_quantus.py)
#      and ResNet-18 at 224 px (scripts/bench_224.py, MPRT and sMPRT with 50 samples);
#   4. the paper's Fig. 2 configuration with random weights: Inception v3, its 17 blocks,
#      200 images of 299 px, the paper's methods, with its wall time.
# Each step has a time limit of its own (a step over it is stopped and reported as such),
# and the next step still runs.
#
# Usage: scripts/gpu_check.sh [OUT]      (OUT: gpu_check.txt; the JSON files go beside it)
# Environment:
#   DEVICE=cuda|cpu   where the model runs (default: cuda when torch sees one, else cpu)
#   SIZE=full|tiny    full: the sizes above; tiny: a few images and samples, for a test on a CPU
#   PYTHON=...        the interpreter with sanity installed (default: python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=$(realpath -m "${1:-gpu_check.txt}")
DIR=$(dirname "$OUT")
mkdir -p "$DIR"
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
SIZE=${SIZE:-full}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SIZE" = tiny ]; then
  PARITY=(--images 2 --size 32 --states 2 --classes 10)
  DIGITS=(--images 3 --reps 1 --steps 2 --samples 2 --items gradient,input_x_gradient --sanity-max-batch 8
          --quantus-batches 3 --floor-batches 4 --floor-samples 16 --min-seconds 0 --max-runs 1)
  R224=(--images 2 --size 16 --samples 2 --classes 5 --floor-batches 2 --auto-limit 8 --quantus-batch 2)
  FIG2=(n_images=2 'method=[gradient]' n_examples=1 test.seeds=1)
  IMAGES=10; LIMITS=(300 300 300 600 600)
elif [ "$SIZE" = full ]; then
  PARITY=(--images 16 --size 224 --states 6)
  DIGITS=(--images 200 --reps 1 --items gradient,input_x_gradient,gradcam --min-seconds 1 --max-runs 3)
  R224=(--images 64 --size 224 --samples 50)
  FIG2=(n_images=200 test.seeds=1)  # one draw, as the paper
  IMAGES=200; LIMITS=(45 30 60 110 210)  # 455 s of the 480
else
  echo "SIZE must be full or tiny, not '$SIZE'" >&2
  exit 2
fi

started=$SECONDS
: > "$OUT"
note() { echo "$*" | tee -a "$OUT"; }
# step NAME LIMIT COMMAND...: run it, its output into OUT, then its exit status and wall time.
step() {
  local name=$1 limit=$2 begin=$SECONDS status
  shift 2
  note "## $name (limit ${limit} s)"
  timeout "$limit" "$@" >> "$OUT" 2>&1
  status=$?
  [ "$status" = 124 ] && note "!! $name: stopped at its limit of ${limit} s"
  note "-- $name: exit $status, wall $((SECONDS - begin)) s"
}

note "# gpu_check: device=$DEVICE size=$SIZE, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
"|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' >> "$OUT" 2>&1

step "CUDA tests" "${LIMITS[0]}" "$PY" -m pytest -q -n 0 -p no:cacheprovider -k cuda \
  tests/test_metrics.py tests/test_cache_key.py tests/test_results.py tests/test_sharding.py

step "TF32 and bf16 parity" "${LIMITS[1]}" "$PY" scripts/gpu_parity.py --device "$DEVICE" "${PARITY[@]}" \
  --out "$DIR/gpu_parity.json"

step "digits against Quantus" "${LIMITS[2]}" "$PY" scripts/bench_vs_quantus.py --device "$DEVICE" "${DIGITS[@]}" \
  --out "$DIR/bench_vs_quantus_$DEVICE.json"

# MPRT and sMPRT in two calls, so that a slow sMPRT cannot take MPRT's figures with it.
step "ResNet-18 at 224 px: MPRT" "$(( ${LIMITS[3]} / 3 ))" "$PY" scripts/bench_224.py --device "$DEVICE" \
  "${R224[@]}" --items mprt --out "$DIR/bench_224_mprt_$DEVICE.json"
step "ResNet-18 at 224 px: sMPRT" "$(( ${LIMITS[3]} * 2 / 3 ))" "$PY" scripts/bench_224.py --device "$DEVICE" \
  "${R224[@]}" --items smprt --out "$DIR/bench_224_smprt_$DEVICE.json"

# The paper's Fig. 2: 200 images of 10 classes (crops of scikit-image's photos, as class
# folders), Inception v3 with random weights, the 17 blocks, the paper's methods.
"$PY" - "$WORK/images" "$IMAGES" <<'EOF' >> "$OUT" 2>&1
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

root, n = Path(sys.argv[1]), int(sys.argv[2])
photos = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
photos = [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
generator = np.random.default_rng(0)
for i in range(n):
    photo = photos[i % len(photos)][..., :3]
    side = int(generator.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
    top = int(generator.integers(0, photo.shape[0] - side + 1))
    left = int(generator.integers(0, photo.shape[1] - side + 1))
    folder = root / f"class_{i % 10}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo[top:top + side, left:left + side]).resize((299, 299)).save(folder / f"{i:03d}.png")
print(f"{n} images of 299 px in 10 class folders")
EOF
step "Fig. 2: Inception v3, random weights" "${LIMITS[4]}" "$PY" -m sanity_cli.cli run \
  +experiment=fig3_cascade_inception model.pretrained=false dataset.path="$WORK/images" device="$DEVICE" \
  cache_dir="$WORK/cache" hydra.run.dir="$DIR/fig2_run" "${FIG2[@]}"
if [ -f "$DIR/fig2_run/run.json" ]; then
  "$PY" -c 'import json, sys; t = json.load(open(sys.argv[1]))["timing_s"]
print("fig2 timing: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))' "$DIR/fig2_run/run.json" >> "$OUT" 2>&1
fi

note "# gpu_check done in $((SECONDS - started)) s"
