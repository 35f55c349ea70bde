#!/usr/bin/env bash
# The GPU suite on a lent H100/H200 (no network there), from the repository root:
#   here, once:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp lazy-importer
#   device run:  bash bench/gpu_session.sh [gpu_suite.py options]     (carry .whl; results and log land in $OUT)
# The machine's image has torch, accelerate, transformers, peft, safetensors and pytest; diffusers comes as wheels.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# dit.train and dit.pipelines live in train/ and pipelines/: link them into dit/ (this copy only) so the source tree
# imports as the installed package does, for the suite and for pytest alike
ln -sfn ../train dit/train
ln -sfn ../pipelines dit/pipelines
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu_suite_out}"
mkdir -p "$out"
python3 -c "import torch, diffusers, accelerate, transformers, dit.train, dit.pipelines; print(torch.__version__, \
diffusers.__version__, accelerate.__version__, transformers.__version__, torch.cuda.get_device_name())"
status=0
python3 bench/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log" || status=$?
rm -f dit/train dit/pipelines
exit "$status"
