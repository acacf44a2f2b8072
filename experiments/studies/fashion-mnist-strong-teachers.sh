#!/usr/bin/env bash
# Teachers of the Fashion-MNIST study in the regime where distillation can help: trained on the full
# 60,000-image training split (the first study's teachers saw a 10,000-image subset), so that they are
# clearly stronger than what a width-4 ResNet-18 student reaches by PGD-AT on its 3,000 images.
# Eight teachers from four families (eight, so that k = 3 gives C(8, 3) = 56 sets: a claim study needs
# about 29 sets for 80% power at |rho| = 0.5, more than the 20 of six teachers); PGD-AT at eps 0.1 with a 3-step inner PGD (step eps/2): fast AT
# (one FGSM step) overfitted catastrophically on the full split (the first run of this script: PGD
# accuracy of ResNet-18 and PreAct-ResNet-18 fell from about 0.69 at epoch 3 to 0.25 and 0.19 at
# epoch 10). The last epoch's weights are kept (no checkpoint chosen on the test set); final clean /
# PGD-20 on 2,000 test images. CNNs first in family order, so a partial run still spans families. Resumable: run it again after an
# interruption and each teacher continues from its last checkpoint (a finished one, whose weights
# and pool entry exist, is left as it is; a run directory without a checkpoint starts again).
#
#   OMP_NUM_THREADS=1 bash experiments/studies/fashion-mnist-strong-teachers.sh [OUT_DIR]
#
# OUT_DIR defaults to results/fashion-mnist-strong/teachers; each teacher writes NAME.safetensors,
# NAME.yaml (its pool entry) and NAME.run/ (config, per-epoch summary, metrics).
set -euo pipefail
out=${1:-results/fashion-mnist-strong/teachers}
mkdir -p "$out"
threads=${OMP_NUM_THREADS:-1}

teacher() {  # NAME FAMILY EPOCHS ARGS...
  local name=$1 family=$2 epochs=$3
  shift 3
  if [[ -f "$out/$name.safetensors" && -f "$out/$name.yaml" ]]; then
    echo "$name: finished earlier ($out/$name.yaml)"; return 0
  fi
  local resume=()
  [[ -f "$out/$name.run/checkpoint.pt" ]] && resume=(--resume)
  [[ -z "${resume[*]}" && -d "$out/$name.run" ]] && rm -r "$out/$name.run"  # a start without a checkpoint
  darht train-teacher --name "$name" --family "$family" --dataset fashion-mnist --eps 0.1 --method pgd-at \
    --method-kwargs '{"steps": 3, "alpha": 0.05}' \
    --epochs "$epochs" --final-eval-samples 2000 --final-attacks clean,pgd20 --seed 0 --device cpu \
    --out "$out/$name.safetensors" "${resume[@]}" "$@"
}

teacher rn18_w8 cnn 10 --arch resnet18_cifar --model-kwargs '{"width": 8}' --lr 0.1
teacher vit_p4 transformer 10 --arch vit_tiny_patch16_224 \
  --model-kwargs '{"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}' \
  --lr 0.003 --optimizer adamw --weight-decay 0.05
teacher mixer mlp 10 --arch mixer_cifar --model-kwargs '{"patch_size": 4, "embed_dim": 64, "num_blocks": 4}' \
  --lr 0.003 --optimizer adamw --weight-decay 0.05
teacher convnext convnext 10 --arch convnext_atto --model-kwargs '{"dims": [24, 48, 96, 192], "depths": [1, 1, 2, 1]}' \
  --input-size 32 --lr 0.003 --optimizer adamw --weight-decay 0.05
teacher preact_w8 cnn 10 --arch preactresnet18_cifar --model-kwargs '{"width": 8}' --lr 0.1
teacher resmlp mlp 10 --arch resmlp_cifar --model-kwargs '{"patch_size": 4, "embed_dim": 64, "num_blocks": 4}' \
  --lr 0.003 --optimizer adamw --weight-decay 0.05
teacher rn18_w6 cnn 10 --arch resnet18_cifar --model-kwargs '{"width": 6}' --lr 0.1
teacher vit_p7 transformer 10 --arch vit_tiny_patch16_224 \
  --model-kwargs '{"patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 2}' \
  --lr 0.003 --optimizer adamw --weight-decay 0.05
echo "teachers done ($threads thread(s))"
