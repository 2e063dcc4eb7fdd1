#!/usr/bin/env bash
# Does the temporal reward teach the model to use frame order? From ONE SFT checkpoint, with the same seeds, data
# and step budget: plain GRPO (--temporal=False: its shuffled rollouts only measure p~), T-GRPO as in the paper
# (eq. 2-3), T-GRPO with the bonus added to the advantages, and T-GRPO and GRPO without the std division (Dr. GRPO).
# Every model, the SFT one included, is evaluated with the shuffled-frame diagnostic; plot.py draws the curves and
# the table.
#   python synthetic.py out/synthetic && python sft.py      # once
#   bash compare.sh [out/compare] ["0 1 2"]                 # STEPS=150 LR=1e-4 SFT=out/sft JOBS=2 by default
set -euo pipefail
root=${1:-out/compare}
seeds=${2:-"0 1 2"}
steps=${STEPS:-150}
jobs=${JOBS:-2}
lr=${LR:-1e-4}
sft=${SFT:-out/sft}
declare -A methods=(
  [grpo]="--temporal=False"
  [tgrpo]="--temporal=True"
  [tgrpo_adv]="--temporal=True --bonus_to=advantage"
  [tgrpo_noscale]="--temporal=True --scale_rewards=False"
  [grpo_noscale]="--temporal=False --scale_rewards=False"
)
mkdir -p "$root"
python eval.py --model_path="$sft" --shuffled=True --out_dir="$root/sft/eval" > /dev/null
run_one() {  # seed method: train from the SFT checkpoint, then evaluate
  local run="$root/${2}_seed$1"
  rm -rf "$run"  # a rerun of the comparison trains afresh (tgrpo.py refuses a used out_dir without --resume)
  # shellcheck disable=SC2086  # the method's flags are separate words
  python tgrpo.py --init_from="$sft" --seed="$1" ${methods[$2]} --max_steps="$steps" --lr="$lr" \
    --ckpt_interval="$steps" --out_dir="$run" > "$run.log" 2>&1
  python eval.py --model_path="$run" --shuffled=True --out_dir="$run/eval" > /dev/null
}
pids=()
for seed in $seeds; do
  for method in grpo tgrpo tgrpo_adv tgrpo_noscale grpo_noscale; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 5; done  # JOBS runs at once, one CPU thread each
    run_one "$seed" "$method" &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the comparison
python plot.py "$root"
