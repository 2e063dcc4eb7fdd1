#!/usr/bin/env bash
# Does the temporal reward teach the model to use frame order? From ONE SFT checkpoint, with the same seeds, data
# and step budget: plain GRPO (--temporal=False: its shuffled rollouts only measure p~), T-GRPO as in the paper
# (eq. 2-3), T-GRPO with the bonus added to the advantages, T-GRPO and GRPO without the std division (Dr. GRPO),
# T-GRPO with the strict contrast (no bonus on ties) and with the response-level temporal credit. Every model, the
# SFT one included, is evaluated with the shuffled-frame diagnostic on DATA's eval set; plot.py draws the curves and
# the table (RESULTS.md, "Does the temporal reward help?").
#   bash compare.sh [out/compare] ["0 1 2"]
# It builds what it needs once: the data (python synthetic.py out/synthetic_big --n_rl=2000 --n_eval=2000) and the
# SFT start (python sft.py --data_dir=out/synthetic_big --max_steps=500 --out_dir=out/sft500, bit for bit the same
# on the same kind of CPU: start.txt keeps its weights' sha256, and a comparison refuses another start).
# Environment: STEPS LR TEMP TOKENS SFT SFT_STEPS DATA JOBS RESULTS CKPT EXTRA; METHODS="grpo ..." (a subset).
# Stopped or killed, it goes on where it was when run again: a finished run (its eval written) is kept, an unfinished
# one resumes from its last checkpoint (every CKPT steps), one killed before its first checkpoint starts again. A
# longer STEPS resumes the finished runs' checkpoints too (the lr is constant). RESULTS (results/<name>): each run's
# metrics.jsonl.gz and eval summary.json, the start's, and start.txt are copied there as they finish, so that
# `python plot.py results/<name>` redraws the table and curves anywhere; the weights stay in the out folder.
set -euo pipefail
root=${1:-out/compare}
seeds=${2:-"0 1 2"}
steps=${STEPS:-1200}  # where plain GRPO gains 5 points from the 500-step start (RESULTS.md)
jobs=${JOBS:-2}
lr=${LR:-5e-5}
temperature=${TEMP:-0.7}
tokens=${TOKENS:-96}
sft=${SFT:-out/sft500}
sft_steps=${SFT_STEPS:-500}  # the SFT start's length, where compare.sh builds it
data=${DATA:-out/synthetic_big}
ckpt=${CKPT:-100}
results=${RESULTS:-}
extra=${EXTRA:-}  # flags every run takes (the recipe's levers, e.g. "--filter_groups=True")
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

# the data and the start, built once; the start's weights are the comparison's identity
if [ ! -f "$data/eval.json" ]; then
  python synthetic.py "$data" --n_rl=2000 --n_eval=2000
fi
if [ ! -f "$sft/latest" ]; then
  python sft.py --data_dir="$data" --max_steps="$sft_steps" --out_dir="$sft"
fi
start_sha=$(sha256sum "$sft/$(cat "$sft/latest")/model.safetensors" | cut -d' ' -f1)
if [ -n "$results" ]; then
  mkdir -p "$results"
  if [ -f "$results/start.txt" ] && ! grep -q "$start_sha" "$results/start.txt"; then
    echo "$sft is not the start $results was made from (start.txt's sha256): rebuild it from start.txt's command" >&2
    exit 1
  fi
  # the start's own command, from its run.json (the SFT run that made it)
  sft_command=$(python -c "import json, sys; c = json.load(open(sys.argv[1]))['config']; print(
    f\"python sft.py --data_dir={c['data_dir']} --max_steps={c['max_steps']} --seed={c['seed']}\",
    f\"--prompt_style={c['prompt_style']} --out_dir={c['out_dir']}\")" "$sft/$(cat "$sft/latest")/run.json")
  {
    echo "start: $sft/$(cat "$sft/latest"), model.safetensors sha256 $start_sha"
    echo "made by: $sft_command"
    echo "data: $data, rl.json sha256 $(sha256sum "$data/rl.json" | cut -d' ' -f1), eval.json sha256 $(sha256sum "$data/eval.json" | cut -d' ' -f1)"
    echo "(the default data: python synthetic.py out/synthetic_big --n_rl=2000 --n_eval=2000)"
    echo "STEPS=$steps LR=$lr TEMP=$temperature TOKENS=$tokens EXTRA=\"$extra\" METHODS=\"$chosen\"" \
      "bash compare.sh $root \"$seeds\" (this call's; earlier calls' runs are kept)"
  } > "$results/start.txt"
fi

collect() {  # run name: its small files into RESULTS
  [ -n "$results" ] || return 0
  mkdir -p "$results/$1/eval"
  cp "$root/$1/eval/summary.json" "$results/$1/eval/summary.json"
  if [ -f "$root/$1/metrics.jsonl" ]; then
    gzip -9 -n -c "$root/$1/metrics.jsonl" > "$results/$1/metrics.jsonl.gz"
  fi
}
evaluate() {  # model out_dir: the shuffled-frame diagnostic on DATA's eval set (eval.py resumes its own work)
  python eval.py --model_path="$1" --data="$data/eval.json" --shuffled=True --batch_size=32 \
    --out_dir="$2" > /dev/null
}
run_one() {  # seed method: train from the SFT checkpoint (or resume), then evaluate
  local name="${2}_seed$1"
  local run="$root/$name"
  local resume=False
  if [ -f "$run/eval/summary.json" ] && [ "$(cat "$run/latest")" = "$(printf 'step_%06d' "$steps")" ]; then
    collect "$name"  # finished at this length: kept
    return 0
  fi
  if [ -f "$run/latest" ]; then
    resume=True
    rm -rf "$run/eval"  # a longer run's eval is made anew
  else
    rm -rf "$run"  # killed before its first checkpoint: nothing to go on from
  fi
  mkdir -p "$run"
  # shellcheck disable=SC2086  # the method's flags are separate words
  python tgrpo.py --init_from="$sft" --train_json="$data/rl.json" --seed="$1" ${methods[$2]} $extra \
    --max_steps="$steps" --lr="$lr" --temperature="$temperature" --max_new_tokens="$tokens" \
    --ckpt_interval="$ckpt" --keep_checkpoints=1 --keep_weights=False --resume="$resume" \
    --out_dir="$run" >> "$run.log" 2>&1 || return 1
  evaluate "$run" "$run/eval"
  collect "$name"
}
evaluate_start() {
  [ -f "$root/sft/eval/summary.json" ] || evaluate "$sft" "$root/sft/eval"
  if [ -n "$results" ]; then
    mkdir -p "$results/sft/eval"
    cp "$root/sft/eval/summary.json" "$results/sft/eval/summary.json"
    gzip -9 -n -c "$sft/metrics.jsonl" > "$results/sft/metrics.jsonl.gz"
  fi
}
# a job that fails says so in this file; the comparison then fails after the others end. (Waiting on each job's pid
# does not work: `jobs` in the loop below lets bash forget finished jobs, and `wait PID` then stops the script with
# "pid N is not a child of this shell" while runs go on.)
failed="$root/failed.txt"
rm -f "$failed"
record_failure() {  # command...: run it; on failure, append it to $failed
  "$@" || echo "failed (exit $?): $*" >> "$failed"
}
record_failure evaluate_start &
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
python plot.py "${results:-$root}"
