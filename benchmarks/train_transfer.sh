#!/usr/bin/env bash
# Transfer learning offline: pretrain ResNet-18 on five CIFAR-10 classes, transfer it to the other five with few
# labels (frozen backbone, fine-tuned backbone) against the same model from scratch; then compare the three.
# No ImageNet weights are reachable here: the "pretrained" weights are the ones step 1 trains, from random init.
# usage: benchmarks/train_transfer.sh [DATA] [OUT]   (defaults below; OUT must not hold these runs yet)
set -euo pipefail

DATA=${1:-/work/shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-.cache/runs/transfer}
PRETRAIN_CLASSES=airplane,automobile,bird,cat,deer
TARGET_CLASSES=dog,frog,horse,ship,truck
PYTHON=${PYTHON:-python}

# Shared by every run: ResNet-18 (torchvision's ImageNet architecture) at 32x32 to keep it cheap on a CPU,
# light augmentation (flip + 2-pixel crop).
COMMON=(--model resnet18_transfer --input-size 32 --data "$DATA" --nesterov --label-smoothing 0.1
        --rotate-degrees 0 --translate 0 --brightness 0 --contrast 0 --crop-padding 2 --no-progress)

train() {
    local name=$1
    shift
    echo "== $name: $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PYTHON" -m training train "${COMMON[@]}" --out "$OUT/$name" "$@"
}

# 1. The source task: 1500 images per class of the first five classes.
train pretrain-5 --classes "$PRETRAIN_CLASSES" --train-per-class 1500 --epochs 3 --batch-size 128 --lr 0.1 \
    --schedule onecycle --warmup-epochs 0.5

# 2. The target task: 100 labelled images per class of the other five; the same schedule for all three.
FEW=(--classes "$TARGET_CLASSES" --train-per-class 100 --epochs 8 --batch-size 50 --lr 0.05 --schedule cosine
     --warmup-epochs 1)
train few-scratch "${FEW[@]}"
train few-frozen "${FEW[@]}" --pretrained "$OUT/pretrain-5/checkpoint.pt" --mode frozen
train few-finetune "${FEW[@]}" --pretrained "$OUT/pretrain-5/checkpoint.pt" --mode finetune --backbone-lr-scale 0.1

echo "== done: $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" -m training compare "$OUT/few-scratch" "$OUT/few-frozen" "$OUT/few-finetune" --out "$OUT/comparison"
