#!/usr/bin/env bash
# Does the temporal reward teach the model to use frame order? From ONE SFT checkpoint, with the same seeds, data
# and step budget: plain GRPO (--temporal=False: its shuffled rollouts only measure p~), T-GRPO as in the paper
# (eq. 2-3), T-GRPO with the bonus added to the advantages, T-GRPO and GRPO without the std division (Dr. GRPO),
# T-GRPO with the strict contrast (no bonus on ties) and with the response-level temporal credit. Every model, the
# SFT one included, is evaluated with the shuffled-frame diagnostic on DATA's eval set; plot.py draws the curves and
# the table (RESULTS.md, "Does the temporal reward help?").
#   python synthetic.py out/synthetic_big --n_rl=2000 --n_eval=2000                    # once: 2,000 RL, 2,000 eval
#   python sft.py --data_dir=out/synthetic_big --max_steps=1000 --out_dir=out/sft1000  # once: a short SFT
#   bash compare.sh [out/compare] ["0 1 2"]
# Environment: STEPS=1800 LR=5e-5 TEMP=0.7 TOKENS=96 SFT=out/sft1000 DATA=out/synthetic_big JOBS=2
# STEPS: 1,800 is where plain GRPO beats this SFT start by 5 points over 3 seeds (RESULTS.md); all 21 runs then take about
# 9 hours on 2 cores. STEPS=200 runs the comparison in about 70 minutes, where GRPO has not yet learnt.
# METHODS="grpo ..." (a subset). TEMP: rollout temperature (RESULTS.md: what was tried, and why these).
# TOKENS: rollout length; at tgrpo.py's 64 every describe and change_time answer (65-73 tokens) is cut before its
# </answer> and scores 0. The quick start's out/synthetic (400 eval records) keeps its README figures; the comparison
# needs the larger eval (2,000 records, 1,400 temporal videos: a binomial error of 1.3 points or less, not 3).
set -euo pipefail
root=${1:-out/compare}
seeds=${2:-"0 1 2"}
steps=${STEPS:-1800}
jobs=${JOBS:-2}
lr=${LR:-5e-5}
temperature=${TEMP:-0.7}
tokens=${TOKENS:-96}
sft=${SFT:-out/sft1000}
data=${DATA:-out/synthetic_big}
declare -A methods=(
  [grpo]="--temporal=False"
  [tgrpo]="--temporal=True"
  [tgrpo_adv]="--temporal=True --bonus_to=advantage"
  [tgrpo_noscale]="--temporal=True --scale_rewards=False"
  [grpo_noscale]="--temporal=False --scale_rewards=False"
  [tgrpo_strict]="--temporal=True --strict_contrast=True"
  [tgrpo_credit]="--temporal=True --temporal_credit=True"
)
chosen=${METHODS:-"grpo tgrpo tgrpo_adv tgrpo_noscale grpo_noscale tgrpo_strict tgrpo_credit"}
mkdir -p "$root"
evaluate() {  # model out_dir: the shuffled-frame diagnostic on DATA's eval set
  python eval.py --model_path="$1" --data="$data/eval.json" --shuffled=True --batch_size=32 \
    --out_dir="$2" > /dev/null
}
run_one() {  # seed method: train from the SFT checkpoint, then evaluate
  local run="$root/${2}_seed$1"
  rm -rf "$run"  # a rerun of the comparison trains afresh (tgrpo.py refuses a used out_dir without --resume)
  # shellcheck disable=SC2086  # the method's flags are separate words
  python tgrpo.py --init_from="$sft" --train_json="$data/rl.json" --seed="$1" ${methods[$2]} \
    --max_steps="$steps" --lr="$lr" --temperature="$temperature" --max_new_tokens="$tokens" \
    --ckpt_interval="$steps" --out_dir="$run" > "$run.log" 2>&1 || return 1
  evaluate "$run" "$run/eval"
}
# a job that fails says so in this file; the comparison then fails after the others end. (Waiting on each job's pid
# does not work: `jobs` in the loop below lets bash forget finished jobs, and `wait PID` then stops the script with
# "pid N is not a child of this shell" while runs go on.)
failed="$root/failed.txt"
rm -f "$failed"
record_failure() {  # command...: run it; on failure, append it to $failed
  "$@" || echo "failed (exit $?): $*" >> "$failed"
}
record_failure evaluate "$sft" "$root/sft/eval" &
for seed in $seeds; do
  for method in $chosen; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 5; done  # JOBS runs at once, one CPU thread each
    record_failure run_one "$seed" "$method" &
  done
done
wait  # for every job
if [ -s "$failed" ]; then
  cat "$failed" >&2
  exit 1
fi
python plot.py "$root"
