#!/usr/bin/env bash
# `annotator simulate` on a borrowed GPU machine whose Python already has torch, torchvision,
# opencv and onnxruntime but not this project's training extra (e.g. a cloud notebook image or
# the developers' rented H200). Users with their own GPU box do not need this: they install the
# project with `pip install -e '.[train]'` and run `annotator simulate --device 0 --workers 8`.
#
# Before (on a machine with pip access): deploy/dev/fetch_train_wheels.sh fills .whl/ with the
# training extra's pure-Python pieces for the target's Python (7.8 MB). Then, on the GPU machine,
# from the repository root:
#     deploy/dev/gpu_simulate.sh OUT_DIR [annotator simulate arguments...]
# e.g. deploy/dev/gpu_simulate.sh $OUT/sim --seeds 3 --imgsz 416 --pool 2400 --auto-weight 0.0833
# Every finished unit is kept in OUT_DIR, so a second call with the same arguments resumes.
# Environment: PYTHON (python3), SITE (/tmp/site: where the wheels go), DEVICE (0), WORKERS (8).
set -euo pipefail
out=${1:?usage: deploy/dev/gpu_simulate.sh OUT_DIR [annotator simulate arguments...]}
shift
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
mkdir -p "$site"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Offline ultralytics with its settings in a private folder (as the tests do): no download,
# no telemetry, no font fetch.
export YOLO_OFFLINE=1 YOLO_CONFIG_DIR="$site/yolo-config" MPLCONFIGDIR="$site/mpl"
# ultralytics imports polars only to copy results.csv into each checkpoint, inside a
# try/except that keeps an empty dict on any error; polars' runtime wheel (50 MB) does not fit
# a 64 MB transfer beside the tree, so where polars is missing a stub whose read_csv raises
# stands in for it (the checkpoints then carry no training-curve table; nothing else changes).
if ! "$py" -c "import polars" 2> /dev/null; then
    mkdir -p "$site/polars"
    printf '%s\n' '"""Stand-in written by deploy/dev/gpu_simulate.sh: polars is not installed."""' \
        'def read_csv(*args, **kwargs):' \
        '    raise RuntimeError("polars is not installed (stand-in from deploy/dev/gpu_simulate.sh)")' \
        > "$site/polars/__init__.py"
    echo "polars missing: stand-in at $site/polars (checkpoints carry no results table)"
fi
"$py" - <<'PY'
import torch, ultralytics, onnxruntime
print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}"
      f"{' (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else ''}, "
      f"ultralytics {ultralytics.__version__}, onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
PY
exec "$py" -m service.cli simulate --out "$out" --device "${DEVICE:-0}" --workers "${WORKERS:-8}" "$@"
