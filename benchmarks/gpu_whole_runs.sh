#!/usr/bin/env bash
# The GPU whole-run measurements as two device commands of at most 560 s of steps each (a call of
# at most 10 minutes holds one, with the machine's start on top):
#
#   OUT=gpu_out bash benchmarks/gpu_whole_runs.sh [quick]           # part 1
#   PART=2 OUT=gpu_out bash benchmarks/gpu_whole_runs.sh [quick]    # part 2
#
# Whole experiments end to end (benchmarks/full_run.py, synthetic data of the real size and
# shape, 256x256, 32 features). Part 1: run1 with a cold and a warm compilation cache (compile
# times), the baseline recipe (100 epochs, evaluation every epoch), the ablation (5 arms), then
# the XLA A/B of the train step (benchmarks/train_step.py: as shipped, convolutions in command
# buffers, one-pass BatchNorm statistics). Part 2: packed runs (benchmarks/packed_runs.py: 1, 2,
# 4 seeds alone and packed with vmap, batch 16) and cv5. Each step has its own limit; the
# carried wheels (.whl/) are installed first when present (experiments/gpu_prepare.sh). The
# synthetic data set is built once, in /tmp/unet_jax_syn. `quick`: tiny sizes, for a dry run on
# the CPU.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv 2>/dev/null; } > "$OUT/env.txt"
SET=""; SYN=110,20,48; REPS=5; SIZE=256; FEATURES=32; PACK_SYN=20,20,256
if [ "${1:-}" = quick ]; then
  SET="--set image_size=32 --set features=4 --set epochs=2"; SYN=10,6,8; REPS=1; SIZE=32
  FEATURES=4; PACK_SYN=2,4,32
fi
DATA="--synthetic $SYN --synthetic_dir /tmp/unet_jax_syn"
step() {  # step NAME LIMIT CMD...
  local name=$1 limit=$2; shift 2
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $?"; tail -8 "$OUT/$name.log"
}
if [ "${PART:-1}" = 1 ]; then
# shellcheck disable=SC2086
step run1 120 $PY -m benchmarks.full_run --exp run1 $DATA $SET --out "$OUT/run1.json"
# shellcheck disable=SC2086
step baseline 200 $PY -m benchmarks.full_run --exp baseline --caches cold $DATA $SET \
  --out "$OUT/baseline.json"
# shellcheck disable=SC2086
step ablation 130 $PY -m benchmarks.full_run --exp ablation --caches cold $DATA $SET \
  --out "$OUT/ablation.json"
step xla_ab 110 $PY -m benchmarks.train_step --batch 16 --features "$FEATURES" \
  --image-size "$SIZE" --reps $REPS \
  --variants "jax;jax:flags=gpucmdconv;jax:fn;jax:fn,bn=onepass" --json "$OUT/xla_ab.json"
exit 0
fi
step packed 200 $PY -m benchmarks.packed_runs --runs 1,2,4 --modes alone,vmap --batch 16 \
  --features "$FEATURES" --image-size "$SIZE" --synthetic "$PACK_SYN" --reps $REPS \
  --out "$OUT/packed.json"
# shellcheck disable=SC2086
step cv5 340 $PY -m benchmarks.full_run --exp cv5 --caches cold $DATA $SET \
  --out "$OUT/cv5.json"
