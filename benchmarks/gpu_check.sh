#!/usr/bin/env bash
# The checks for a lent CUDA machine, in two phases (one call each where what travels with a call is limited):
#
#   bash benchmarks/gpu_check.sh train   # GPU training (recipes best, lesson, and best for longer); export
#   bash benchmarks/gpu_check.sh serve   # needs onnxruntime-gpu: benchmarks/gpu_check.py, the export formats
#                                        # table with the CUDA provider, the tests marked gpu
#
# Settings (environment): DATA (CIFAR-10 archive), WORK (runs, packages, caches; kept between the phases),
# OUT (reports and logs), PYTHON, LESSON_RUN (a trained cnn_bn run for the export table), EXPORT_MODELS,
# FALLBACK_PACKAGE (checked in `serve` when the trained one is missing); DEVICE and TRAIN_ARGS (appended to
# every training command) try the script on a CPU: DEVICE=cpu TRAIN_ARGS="--epochs 1 --train-per-class 20".
# Each step is bounded in time and a failed step is reported and skipped: one failure does not cost the lease.
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
WORK=${WORK:-/tmp/gpuwork}
OUT=${OUT:-.cache/gpu_check}
PYTHON=${PYTHON:-python3}
LESSON_RUN=${LESSON_RUN:-}
FALLBACK_PACKAGE=${FALLBACK_PACKAGE:-}
DEVICE=${DEVICE:-cuda}
read -r -a TRAIN_ARGS <<<"${TRAIN_ARGS:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$WORK" "$OUT"

step() {  # step SECONDS NAME COMMAND...: run, log to $OUT/NAME.log, report time and exit status
    local limit=$1 name=$2 started=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - started)) s"
    tail -n 4 "$OUT/$name.log"
}

train() {  # train NAME SECONDS ARGS...: a training run into $WORK/runs/NAME, its metrics copied to $OUT
    local name=$1 limit=$2
    shift 2
    step "$limit" "train-$name" "$PYTHON" -m training train --data "$DATA" --device "$DEVICE" \
        --out "$WORK/runs/$name" --cache-dir "$WORK/datasets" --no-progress "$@" "${TRAIN_ARGS[@]}"
    cp "$WORK/runs/$name/metrics.json" "$OUT/metrics-$name.json" 2>/dev/null
}

case "${1:-}" in
train)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
    rm -rf "$WORK/runs"  # fresh runs: a run folder left by an earlier try would be refused
    "$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
    train best 150 --recipe best
    # fp32 formats only: the GPU serves those (int8 QDQ graphs are for the CPU).
    step 150 export-best "$PYTHON" -m export --run "$WORK/runs/best" --out "$WORK/packages/best" \
        --no-bentoml --data "$DATA" --overwrite
    train lesson 60 --recipe lesson
    train best-40 200 --recipe best --epochs 40
    ;;
serve)
    # The CUDA and cuDNN libraries of the nvidia-* wheels (beside torch), for an onnxruntime-gpu installed in
    # another folder: its preload_dlls looks for them beside itself only.
    nvidia_libs=$("$PYTHON" -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib/*.so*")})))')
    export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    "$PYTHON" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
    package="$WORK/packages/best"
    [ -f "$package/manifest.json" ] || package=$FALLBACK_PACKAGE
    step 240 gpu-check "$PYTHON" -m benchmarks.gpu_check --package "$package" --data "$DATA" --out "$OUT/gpu_check.md"
    # The lesson's CNN (trained when LESSON_RUN is given) and ResNet-18 (random weights), by default.
    runs=(--models "${EXPORT_MODELS:-cnn_bn,resnet18}")
    [ -n "$LESSON_RUN" ] && runs+=(--run "cnn_bn=$LESSON_RUN")
    step 240 export-formats "$PYTHON" benchmarks/export_formats.py "${runs[@]}" --data "$DATA" --batches 1,16,64,256 \
        --rounds 3 --seconds 0.3 --threads "$(nproc)" --out "$OUT/export_formats_gpu.md"
    step 90 pytest-gpu "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q tests/test_runtime.py tests/test_augment.py
    ;;
*)
    echo "usage: $0 train|serve" >&2
    exit 2
    ;;
esac
