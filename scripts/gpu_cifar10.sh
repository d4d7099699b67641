#!/usr/bin/env bash
# The paper-scale CIFAR-10 chain on one GPU (issue 17), one device command per recipe:
#   1. recipes/diet-cifar10.yaml   DIET VGG16, T = 5                                (< 10 min)
#   2. recipes/stp-cifar10.yaml    PCA pruning, temporal pruning, quantization of 1  (< 10 min)
# then a summary table. Data: $SNNCOMPRESS_DATA (the cifar10-jpg copy). Each run resumes
# where it stopped, so rerunning after a cut loses at most one snapshot interval.
#
#   scripts/gpu_cifar10.sh [OUT] [diet|stp|all]   OUT defaults to runs/gpu-cifar10
#   DRY_RUN=1 scripts/gpu_cifar10.sh OUT          on the CPU: a few images, two batches per epoch,
#                                                 a VGG of VGG16's depth but 8-32 channels wide;
#                                                 the same recipes, stages and switches end to end
#   DATASET=imagefolder:DIR                       another dataset (the dry-run test's synthetic one)
set -euo pipefail
OUT=${1:-runs/gpu-cifar10}
PART=${2:-all}
RECIPES=$(python -c 'import pathlib, snncompress; print(pathlib.Path(snncompress.__file__).parent / "recipes")')
COMMON=()
[[ -n ${DATASET:-} ]] && COMMON+=(--set "data.dataset=$DATASET")
DIET=("${COMMON[@]}")
STP=("${COMMON[@]}" --set "stages.load.checkpoint=$OUT/diet/stages/02-train_snn/model.safetensors")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  TINY=(--set device=cpu --set data.train_subset=64 --set data.test_subset=32 --set data.batch_size=16
        --set measure.robustness_images=16 --set measure.ops_images=8 --set measure.latency_repeats=2
        --set "measure.noise_sigmas=[0.0, 0.1]")
  DIET+=("${TINY[@]}" --set "model.options.features=[8, 8, A, 8, 8, A, 16, 16, 16, A, 16, 16, 16, A, 32, 32, 32, A]"
         --set "model.options.classifier=[32, 32]" --set stages.train_ann.max_batches=2 --set stages.train_ann.epochs=2
         --set stages.convert.calib_images=16 --set stages.convert.calib_timesteps=8 --set stages.convert.chunk=16
         --set stages.train_snn.max_batches=2 --set stages.train_snn.epochs=1)
  STP+=("${TINY[@]}" --set stages.prune_pca.pca_images=16 --set stages.prune_pca.chunk=16
        --set stages.prune_pca.calib_images=16 --set stages.prune_pca.calib_timesteps=8
        --set stages.prune_pca.max_batches=2 --set stages.temporal.max_batches=2
        --set "stages.temporal.step_epochs=[1, 1, 1]" --set "stages.quant_sweep.bits=[8, 4]")
fi
if [[ $PART == all || $PART == diet ]]; then
  start=$SECONDS
  snncompress run "$RECIPES/diet-cifar10.yaml" --out "$OUT/diet" "${DIET[@]}"
  echo "diet: $((SECONDS - start)) s wall"
fi
if [[ $PART == all || $PART == stp ]]; then
  start=$SECONDS
  snncompress run "$RECIPES/stp-cifar10.yaml" --out "$OUT/stp" "${STP[@]}"
  echo "stp: $((SECONDS - start)) s wall"
fi
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':6} {'stage':12} {'test acc':>9} {'T':>3} {'footprint B':>12} {'s/epoch':>8}")
for run in ("diet", "stp"):
    path = out / run / "report.json"
    if not path.is_file():
        continue
    for stage in json.loads(path.read_text())["stages"]:
        m = stage["metrics"]
        acc = f"{m['accuracy']:.4f}" if "accuracy" in m else "-"
        spe = f"{m['seconds_per_epoch']:.1f}" if "seconds_per_epoch" in m else "-"
        print(f"{run:6} {stage['name']:12} {acc:>9} {m.get('timesteps', '-'):>3} "
              f"{m.get('footprint_bytes', '-'):>12} {spe:>8}")
PY
