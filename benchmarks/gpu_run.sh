#!/usr/bin/env bash
# The GPU epoch-time measurements as one script (one short lease of a GPU machine; any CUDA box works).
#
#   OUT=gpu_out bash benchmarks/gpu_run.sh [quick]
#
# `quick` takes a few steps of everything (a dry run); SIZE and FEATURES (default 256 and 32) shrink
# the model for such a dry run.
# Writes into $OUT: env.txt (GPU, driver, versions), check.log (a tiny end-to-end run that proves
# the stack works: train, evaluate, checkpoint), epoch_b16.{log,json} and epoch_b32.{log,json}
# (benchmarks.epoch_time at full size: baseline, tuned PyTorch and unet_jax side by side) and
# full_epoch.{log,json} (measured epochs of the real training loop, baseline recipe).
# The machine's own Python packages are used; if the check fails with them and a `.whl/` folder of
# wheels (this project's pinned flax / optax / orbax-checkpoint) is present, those are installed
# into /tmp/site and the check is repeated. Each step has its own time limit, so one slow step
# cannot eat the others; steps run most important first.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
QUICK=${1:-}

versions() {
  $PY - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
          "orbax-checkpoint", "torch", "numpy", "scikit-image", "scipy", "tqdm", "pillow"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        pass
EOF
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  echo "cpus: $(nproc)"; free -g | head -2
  versions
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

check() {
  timeout 240 $PY -m benchmarks.full_epoch --exp smoke --epochs 4 --synthetic 4,2,12,64 \
    --set image_size=32 --set features=4 --set batch_size=4 >> "$OUT/check.log" 2>&1
}
if ! check; then
  echo "check failed with the machine's packages:"; tail -20 "$OUT/check.log"
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    echo "== retry with the carried wheels" >> "$OUT/check.log"
    versions >> "$OUT/env.txt" 2>&1
    check || { echo "check failed again:"; tail -30 "$OUT/check.log"; exit 1; }
  else
    exit 1
  fi
fi
echo "check passed"; tail -4 "$OUT/check.log"

WORKERS=$(( $(nproc) / 2 > 2 ? $(nproc) / 2 : 2 ))
STEPS16=20; STEPS32=10; REPS=3; EPOCHS=5
SIZE=${SIZE:-256}; FEATURES=${FEATURES:-32}
if [ "$QUICK" = quick ]; then STEPS16=4; STEPS32=2; REPS=1; EPOCHS=4; fi

# The parent process never computes with JAX: keep it off the GPU (the workers set their own).
JAX_PLATFORMS=cpu timeout 300 $PY -m benchmarks.epoch_time --device gpu --image-size $SIZE \
  --features $FEATURES --batch 16 --steps $STEPS16 --reps $REPS --tuned-workers $WORKERS \
  --out "$OUT/epoch_b16.json" > "$OUT/epoch_b16.log" 2>&1
echo "epoch_time batch 16: rc $?"; tail -8 "$OUT/epoch_b16.log"

timeout 200 $PY -m benchmarks.full_epoch --exp baseline --epochs $EPOCHS \
  --set image_size=$SIZE --set features=$FEATURES \
  --out "$OUT/full_epoch.json" > "$OUT/full_epoch.log" 2>&1
echo "full_epoch: rc $?"; tail -6 "$OUT/full_epoch.log"

JAX_PLATFORMS=cpu timeout 300 $PY -m benchmarks.epoch_time --device gpu --image-size $SIZE \
  --features $FEATURES --batch 32 --steps $STEPS32 --reps $REPS --tuned-workers $WORKERS \
  --out "$OUT/epoch_b32.json" > "$OUT/epoch_b32.log" 2>&1
echo "epoch_time batch 32: rc $?"; tail -8 "$OUT/epoch_b32.log"
