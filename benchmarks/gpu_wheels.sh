#!/usr/bin/env bash
# Downloads, here, the wheels benchmarks/gpu_session.sh installs on a GPU image that has jax
# (with CUDA), flax, optax, orbax and torch but not the rest: ml-collections (every phase), and
# grain and array-record with their small dependencies for the `scale` phase's prepared corpus.
# They go to .whl/ (ignored by git); pass it to the machine with the device tool's
# `carry: [".whl"]`. PY is the image's Python (3.12 on the H100 image of 2026-11).
#
#   bash benchmarks/gpu_wheels.sh
set -eu
PY=${PY:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0 \
  tqdm==4.70.1
ls .whl
