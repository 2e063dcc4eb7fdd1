#!/usr/bin/env bash
# Does the temporal reward teach the model to use frame order? T-GRPO against plain GRPO (--temporal=False, whose
# shuffled rollouts only measure p~), from ONE SFT checkpoint, same seeds, data and step budget; then every model,
# the SFT one included, is evaluated with the shuffled-frame diagnostic, and plot.py draws the curves and the table.
#   python synthetic.py out/synthetic && python sft.py      # once
#   bash compare.sh [out/compare] ["0 1 2"]                 # STEPS=300 LR=1e-4 by default
set -euo pipefail
root=${1:-out/compare}
seeds=${2:-"0 1 2"}
steps=${STEPS:-300}
lr=${LR:-1e-4}
python eval.py --model_path=out/sft --shuffled=True --out_dir="$root/sft/eval" > /dev/null
for seed in $seeds; do
  for method in tgrpo grpo; do
    run="$root/${method}_seed$seed"
    temporal=$([ "$method" = tgrpo ] && echo True || echo False)
    python tgrpo.py --init_from=out/sft --seed="$seed" --temporal="$temporal" --max_steps="$steps" --lr="$lr" \
      --ckpt_interval="$steps" --out_dir="$run" > "$root/${method}_seed$seed.log"
    python eval.py --model_path="$run" --shuffled=True --out_dir="$run/eval" > /dev/null
  done
done
python plot.py "$root"
