#!/usr/bin/env bash
# Prepare what experiments/gpu_session.sh needs on a GPU machine that has JAX but no registry:
#
#   bash experiments/gpu_prepare.sh [LGG_DIR]        # LGG_DIR default: ../shared/lgg
#
# - .lgg/: the travel bundle of the real data (LGG_DIR/travel.py pack: lossy WebP images at
#   quality 85, PSNR ~42.5 dB, lossless masks; ~43 MiB, ~4 minutes on 2 cores);
# - .whl/: wheels for Python 3.12 / manylinux x86-64 of what the GPU image lacks (the data-set
#   reader and its dependencies; JAX, Flax, Optax and Orbax are on the image).
# Both folders are ignored through .git/info/exclude (added here if missing): they travel only
# when a device call names them in `carry`, and they never enter the repository.
set -eu
cd "$(dirname "$0")/.."
LGG_DIR=${1:-../shared/lgg}
PY=${PYTHON:-python3}
for d in /.lgg/ /.whl/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done

if [ ! -f .lgg/lgg_travel.zip ]; then
  "$PY" "$LGG_DIR/travel.py" pack .lgg
fi

# Pinned to the versions this project is tested with; each with --no-deps, so every missing
# dependency is named here (the image has absl-py, etils, numpy, protobuf, psutil, pyarrow,
# requests, tqdm, wrapt, cloudpickle).
WHEELS="tensorflow-datasets==4.9.10 array_record==0.8.6 grain==0.2.18 dm-tree==0.1.10
immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0 tensorflow-metadata==1.21.0
googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 importlib_resources==7.1.0
portpicker==1.6.0"
mkdir -p .whl
for w in $WHEELS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$w"
done
# promise (a tensorflow-datasets dependency) is published as a source archive only: build its
# pure-Python wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl promise==2.3
du -sh .lgg .whl
