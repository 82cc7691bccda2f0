#!/bin/bash
# the lm-eval table of the README: both shipped tasks, all 800 held-out questions, five tinyworld systems
# (run 2026-12-01 on this repository's 2-core machine, busy with other jobs; <system>.json beside this script is its output)
cd "$(dirname "$0")/../.."
M=$(python -c "import proxytune.tinyworld as t; print(t.default_models_dir())")
declare -A SYS=(
  [small_base]="base=$M/small-base"
  [large_base]="base=$M/large-base"
  [small_tuned]="base=$M/small-tuned"
  [large_tuned]="base=$M/large-tuned"
  [proxy_tuned_large]="base=$M/large-base,expert=$M/small-tuned,anti_expert=$M/small-base,weights=1.0"
)
mkdir -p "${OUT:-/tmp/lmev}"
for s in small_base large_base small_tuned large_tuned proxy_tuned_large; do
  start=$(date +%s)
  OMP_NUM_THREADS=1 python -m proxytune.integrations.lm_eval --model proxytune --model_args "${SYS[$s]}" \
    --tasks tinyworld_qa,tinyworld_choice --device cpu --batch_size 64 --output_path ${OUT:-/tmp/lmev}/$s > ${OUT:-/tmp/lmev}/$s.log 2>${OUT:-/tmp/lmev}/$s.err
  echo "$s rc=$? $(( $(date +%s) - start )) s"
done
