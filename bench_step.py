"""The toy's T-GRPO step, this tree's code against a base commit's, in one run (issue 27: a step at
least 2x cheaper at the comparison's settings).

    python bench_step.py                                    # against d2197e6, before the speed work
    python bench_step.py --base=HEAD~3 --rounds=5 --model_path=out/sft1000_short

The base commit is unpacked (git archive) into a temporary folder, and the two trees' workers run
in turns, `rounds` times each, so that a load on the machine falls on both alike. A worker loads
`model_path`, then times `steps` T-GRPO steps (rollout, scoring, update: tgrpo.py's functions) on
the first records of `data_dir`'s rl.json, at the comparison's settings: 4 prompts x (G 8 + G~ 4)
rows, rollout temperature 0.7, the KL reference on. No row stops early (model.stop_ids is
emptied): every rollout is `new_tokens` long in both trees, so the responses' length, which a
model's training changes, is not part of the figure. Each tree runs with its own prompt: the base
with the reasoning template, this tree with `prompt_style`. Prints the median step (its first one,
a warm-up, left out) per tree and round, and the ratio this / base.
"""
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

base = "d2197e6"                     # the commit to compare against (today's code before issue 27)
model_path = "out/sft300"            # a checkpoint both trees load (absolute or from here)
data_dir = "out/synthetic_big"       # its rl.json feeds the steps
prompt_style = "short"               # this tree's prompt (the base knows the template only)
rounds = 3                           # turns of (base, this)
steps = 7                            # steps a worker times; the first is a warm-up
new_tokens = 64                      # every rollout's length (about the toy's responses, 53)
beta = 0.04                          # the KL weight: 0 drops the reference pass
worker = False                       # internal: time steps in this process, print json
common.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [])


def time_steps():
    """{"rollout": [s], "update": [s], "step": [s], "prompt_tokens": P} of `steps` steps here."""
    import torch
    import data
    import lifecycle
    import model
    import tgrpo
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # the comparison's settings (compare.sh)
    tgrpo.max_new_tokens = new_tokens
    tgrpo.temperature = 0.7
    tgrpo.beta = beta
    if "prompt_style" in tgrpo.config:
        tgrpo.config["prompt_style"] = prompt_style
    # no stop token: every row decodes new_tokens, in both trees
    model.stop_ids = lambda tokenizer: []
    policy, tokenizer = lifecycle.load_model(model_path, "cpu")
    ref = None
    if beta:
        ref = lifecycle.frozen_reference(model_path, policy)
    opt = common.Optimizer(policy, 5e-5, 0.01, 5.0)
    records, _ = data.load_records(os.path.join(data_dir, "rl.json"))

    times = {"rollout": [], "update": [], "step": []}
    prompt_tokens = 0
    for step in range(steps):
        batch_records = records[step * tgrpo.batch_size:(step + 1) * tgrpo.batch_size]
        start = time.perf_counter()
        out = tgrpo.rollout(policy.eval(), batch_records, tokenizer, step, "cpu")
        rolled = time.perf_counter()
        texts = tokenizer.batch_decode(out.ids, skip_special_tokens=True)
        scores = tgrpo.score(out.examples, out.rows, texts, out.mask.sum(1).tolist())
        # update_batch took the advantages before it took the scores (filter_groups)
        scored = scores
        if "advantages" in inspect.signature(tgrpo.update_batch).parameters:
            scored = scores.advantages
        chosen = tgrpo.update_batch(policy, out, scored, "cpu")
        tgrpo.train_step(opt, policy.train(), ref, chosen.batch, chosen.ids, chosen.mask,
                         chosen.advantages, 5e-5)
        done = time.perf_counter()
        times["rollout"].append(rolled - start)
        times["update"].append(done - rolled)
        times["step"].append(done - start)
        prompt_tokens = out.batch.input_ids.shape[1]
    return times | {"prompt_tokens": prompt_tokens}


def unpack(rev, folder):
    """The files of commit `rev` in `folder` (git archive: no worktree to clean up)."""
    archive = subprocess.run(["git", "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)


def run_worker(tree):
    """One worker in `tree` (its bench_step.py, so its own modules): its time_steps() result."""
    checkpoint = common.latest_checkpoint(model_path) or model_path
    args = [sys.executable, os.path.join(tree, "bench_step.py"), "--worker=True",
            f"--model_path={os.path.abspath(checkpoint)}",
            f"--data_dir={os.path.abspath(data_dir)}", f"--prompt_style={prompt_style}",
            f"--steps={steps}", f"--new_tokens={new_tokens}", f"--beta={beta}"]
    done = subprocess.run(args, cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the worker in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and worker:
    print(json.dumps(time_steps()))
elif __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as base_tree:
        unpack(base, base_tree)
        # the worker script itself is this tree's: the base may predate it
        with open(os.path.join(here, "bench_step.py")) as f:
            script = f.read()
        with open(os.path.join(base_tree, "bench_step.py"), "w") as f:
            f.write(script)
        medians = {"base": [], "this": []}
        for r in range(rounds):
            for name, tree in (("base", base_tree), ("this", here)):
                result = run_worker(tree)
                timed = {key: statistics.median(result[key][1:])
                         for key in ("rollout", "update", "step")}
                medians[name].append(timed["step"])
                print(f"round {r + 1} {name:4s}: step {timed['step']:.3f} s (rollout "
                      f"{timed['rollout']:.3f}, update {timed['update']:.3f}), "
                      f"{result['prompt_tokens']} prompt columns", flush=True)
    ratio = statistics.median(medians["this"]) / statistics.median(medians["base"])
    print(f"step time, median over rounds: base {statistics.median(medians['base']):.3f} s, "
          f"this tree {statistics.median(medians['this']):.3f} s: ratio {ratio:.2f}x "
          "(goal <= 0.5x)")
