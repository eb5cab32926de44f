#!/usr/bin/env bash
# The training recipes' benchmark runs (results: benchmarks/results/training.md): `quick`, the lesson exercise
# (`lesson` recipe with cnn_bn and with cnn_plain, then their comparison), a short probe of `best` and the full `best`.
# usage: benchmarks/train_recipes.sh [DATA] [OUT] [STEPS...]   STEPS: quick lesson best-probe best
# (default: quick lesson best-probe)
# Each run records the date, the load average and its wall time; OUT must not hold these runs yet.
set -euo pipefail

DATA=${1:-/work/shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-.cache/runs/recipes}
shift $(($# < 2 ? $# : 2))
STEPS=("${@:-quick lesson best-probe}")
PYTHON=${PYTHON:-python}

train() {
    local name=$1
    shift
    local start
    start=$(date +%s)
    echo "== $name: $(date -u +%FT%TZ), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PYTHON" -m training train --data "$DATA" --out "$OUT/$name" --no-progress "$@"
    echo "== $name: wall $(($(date +%s) - start)) s, load: $(cut -d' ' -f1-3 /proc/loadavg)"
}

for step in ${STEPS[*]}; do
    case $step in
        quick) train quick --recipe quick ;;
        lesson)
            train lesson-cnn_bn --recipe lesson
            train lesson-cnn_plain --recipe lesson --model cnn_plain
            "$PYTHON" -m training compare "$OUT/lesson-cnn_bn" "$OUT/lesson-cnn_plain" --out "$OUT/lesson-comparison"
            ;;
        # One epoch on 5,000 images: the full-width net's throughput (a full `best` run takes tens of minutes).
        best-probe) train best-probe --recipe best --epochs 1 --train-per-class 500 ;;
        best) train best --recipe best ;;
        *) echo "unknown step $step; valid: quick lesson best-probe best" >&2; exit 2 ;;
    esac
done
