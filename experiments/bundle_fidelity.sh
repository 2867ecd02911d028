#!/usr/bin/env bash
# What the lossy travel bundle does to results: cpu_quick on the unpacked bundle against
# cpu_quick on the lossless data, same seeds, two seeds (the second shows seed noise).
#
#   bash experiments/bundle_fidelity.sh [WORK] [EPOCHS] [SEEDS]   # defaults: /tmp/unet_jax_fidelity 2 "0 1"
#
# EXTRA adds settings to every run (e.g. EXTRA="--set image_size=64 --set features=8" for a
# shorter measurement; the report must then say so).
# Needs ../shared/lgg (the lossless data and its travel.py). Builds the baseline data set of each
# copy once, trains cpu_quick (shortened to EPOCHS epochs) on each, then prints per-patient and
# mean DSC differences (experiments/bundle_fidelity.py). At 2 epochs this is about 40 minutes on
# 2 CPU cores.
set -eu
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/unet_jax_fidelity}
EPOCHS=${2:-2}
SEEDS=${3:-0 1}
LGG=${LGG:-../shared/lgg}
PY=${PYTHON:-python}
mkdir -p "$WORK"
[ -f .lgg/lgg_travel.zip ] || "$PY" "$LGG/travel.py" pack .lgg
[ -d "$WORK/bundle/kaggle_3m" ] || "$PY" .lgg/travel.py unpack "$WORK/bundle"
[ -d "$WORK/lossless/kaggle_3m" ] || "$PY" "$LGG/restore.py" "$WORK/lossless"
for data in lossless bundle; do
  "$PY" -m datasets.lgg_mri_segmentation --manual_dir "$WORK/$data" --data_dir "$WORK/tfds_$data" \
    --config baseline
  # shellcheck disable=SC2086  # EXTRA is a word list on purpose
  for seed in $SEEDS; do
    "$PY" -m experiments.run --exp=cpu_quick --data_dir "$WORK/tfds_$data" \
      --workdir "$WORK/runs/${data}_seed$seed" --set seed="$seed" --set epochs="$EPOCHS" ${EXTRA:-}
  done
done
"$PY" -m experiments.bundle_fidelity "$WORK/runs" $SEEDS
