#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the accelerator tests (tests/test_device.py), then `multibox bench`.
#
# That machine has torch, torchvision, numpy, onnx and onnxruntime but not multibox's other dependencies: download
# them here first, as wheels for its Python 3.12, into .whl/ (kept out of git by `echo /.whl/ >> .git/info/exclude`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pyyaml tqdm matplotlib pyarrow defusedxml pycocotools faster-coco-eval pytest pluggy iniconfig \
#     contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging pillow
# and run this script with .whl carried:  bash scripts/device_check.sh   (DEVICE=cpu ARCH=tiny for a dry run here)
set -uo pipefail
out=${OUT:-device_out}
device=${DEVICE:-cuda}
arch=${ARCH:-ssd300_vgg16}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
MULTIBOX_TEST_DEVICE=$device python3 -m pytest -q -x tests/test_device.py 2>&1 | tail -25 | tee "$out/device_tests.txt"
python3 -m multibox bench --device "$device" --arch "$arch" --profile --workdir /tmp --out "$out/bench.json" \
  ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$out/bench.txt"
