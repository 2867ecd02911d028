#!/usr/bin/env bash
# The report's experiments on the real data at full size, as one script for one GPU lease.
#
#   OUT=DIR bash experiments/gpu_session.sh
#
# Steps, most valuable first, each under its own time limit and all under one deadline, so that
# one slow step cannot eat the rest (a step that no longer fits is skipped and says so):
#   wheels   install the carried wheels (WHEELS, default .whl/) into /tmp/site, if present
#   data     unpack the travel bundle (BUNDLE, default .lgg/: lgg_travel.zip + travel.py) into
#            $WORK/lgg, or take MANUAL_DIR (a kaggle_3m folder) as it is
#   build    build the TFDS data set (baseline preprocessing) into $WORK/tfds
#   run1 run2 ablation baseline cv5 (and ablation_seedN for each N in ABLATION_SEEDS)
#            python -m experiments.run --exp=NAME --data_dir $WORK/tfds --workdir $WORK/runs/NAME
# What comes back in $OUT (at most 8 files, as the lease allows): session.log (every step's
# output), env.txt (GPU, versions), and one NAME.tar.gz per experiment that ran with each run's
# config.json, metrics.jsonl, per_patient.csv and report/ (no checkpoints, no predictions.npz).
#
# Settings (environment): DEADLINE seconds for the whole script (default 540), LIMIT_<step>
# to change one step's limit (e.g. LIMIT_baseline=300), STEPS to choose and order the
# experiments, ABLATION_SEEDS (default empty: extra seeds of the five arms, run after cv5),
# EXTRA (arguments for every experiment, e.g. "--set epochs=1"), ONLY_<exp> (e.g.
# ONLY_cv5="--only fold0": sub-runs), PYTHON (default python3), WORK (default /tmp/unet_jax_gpu).
# TOY=1 is the CPU dry run the tests use: tiny model and images, one epoch, one sub-run of the
# ablation and of cv5.
# Results computed on the travel bundle are on lossy images (PSNR ~42.5 dB): say so where they
# are reported.
set -u
OUT=${OUT:-gpu_session_out}
WORK=${WORK:-/tmp/unet_jax_gpu}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
STEPS=${STEPS:-run1 run2 ablation baseline cv5}
ABLATION_SEEDS=${ABLATION_SEEDS:-}
EXTRA=${EXTRA:-}
if [ "${TOY:-0}" = 1 ]; then
  EXTRA="--set image_size=32 --set features=2 --set batch_size=4 --set epochs=1 $EXTRA"
  ONLY_ablation=${ONLY_ablation:---only run1}
  ONLY_cv5=${ONLY_cv5:---only fold0}
fi
export PYTHONUNBUFFERED=1
# One persistent XLA cache for every run of the session: runs whose shapes agree (the ablation's
# arms but batch32, the folds of cv5) load their compiled programs instead of compiling again.
export UNET_JAX_COMPILE_CACHE=${UNET_JAX_COMPILE_CACHE:-$WORK/xla_cache}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/session.log"
: > "$LOG"
cd "$(dirname "$0")/.."

say() { echo "[gpu_session $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# limit STEP DEFAULT: the step's own limit, cut to what the deadline leaves (0: skip).
limit() {
  local var="LIMIT_$1" left=$((DEADLINE - SECONDS))
  local own=${!var:-$2}
  [ "$left" -lt 20 ] && { echo 0; return; }
  echo $((own < left ? own : left))
}

# step NAME DEFAULT_LIMIT CMD...: run CMD under its limit, log it, never abort the script.
step() {
  local name=$1 t
  t=$(limit "$1" "$2")
  shift 2
  if [ "$t" -le 0 ]; then say "skip $name: the deadline ($DEADLINE s) is reached"; return 1; fi
  say "start $name (limit ${t}s): $*"
  local t0=$SECONDS rc
  timeout --signal=INT --kill-after=20 "$t" "$@" >> "$LOG" 2>&1
  rc=$?
  say "end $name: rc $rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (time limit)')"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "cpus: $(nproc)"
} > "$OUT/env.txt" 2>&1

WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - >> "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
          "array-record", "grain", "numpy", "scipy", "pillow"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "absent")
try:
    import jax
    print("devices", jax.devices())
except Exception as e:  # the log must say why, the script goes on
    print("jax:", e)
EOF
cat "$OUT/env.txt" >> "$LOG"

if [ -n "${MANUAL_DIR:-}" ]; then
  MANUAL=$MANUAL_DIR
  say "data: $MANUAL (given; not the travel bundle)"
else
  BUNDLE=${BUNDLE:-.lgg}
  MANUAL=$WORK/lgg
  if [ ! -d "$MANUAL/kaggle_3m" ]; then
    step unpack 180 $PY "$BUNDLE/travel.py" unpack "$MANUAL" || { say "no data: stop"; exit 1; }
  fi
  say "data: the travel bundle (lossy WebP, PSNR ~42.5 dB; see $BUNDLE/FIDELITY.txt if present)"
fi
DATA_DIR=$WORK/tfds
step build 300 $PY -m datasets.lgg_mri_segmentation --manual_dir "$MANUAL" --data_dir "$DATA_DIR" \
  --config baseline || { say "the data set did not build: stop"; exit 1; }

# pack NAME: the run records (not checkpoints or predictions) of one experiment into $OUT.
pack() {
  local dir=$WORK/runs/$1
  [ -d "$dir" ] || return 0
  (cd "$WORK/runs" && find "$1" \( -name checkpoints -o -name predictions.npz \) -prune -o \
      \( -name config.json -o -name metrics.jsonl -o -name per_patient.csv -o -path '*/report/*' \) \
      -type f -print | tar czf "$OUT/$1.tar.gz" -T -) && say "packed $OUT/$1.tar.gz"
}

# experiment NAME LIMIT EXP [ARGS...]
experiment() {
  local name=$1 lim=$2 exp=$3 only_var="ONLY_$3"
  shift 3
  # shellcheck disable=SC2086  # EXTRA and ONLY_* are word lists on purpose
  step "$name" "$lim" $PY -m experiments.run --exp="$exp" --data_dir "$DATA_DIR" \
    --workdir "$WORK/runs/$name" ${!only_var:-} $EXTRA "$@"
  pack "$name"
}

for exp in $STEPS; do
  case $exp in
    run1|run2) experiment "$exp" 150 "$exp" ;;
    ablation) experiment ablation 420 ablation ;;
    baseline) experiment baseline 420 baseline ;;
    cv5) experiment cv5 600 cv5 ;;
    *) say "unknown step $exp (valid: run1 run2 ablation baseline cv5)" ;;
  esac
done
for seed in $ABLATION_SEEDS; do
  experiment "ablation_seed$seed" 420 ablation --set seed="$seed"
done
say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
