"""Where the metrics go: metrics.jsonl always, Weights & Biases with wandb_log. sft.py and tgrpo.py
run in this process for a few tiny steps, with a stand-in for the wandb module (or its import
blocked), so that wandb need not be installed."""
import json
import os
import runpy
import sys
import types
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def script_args(script, toy, out_dir):
    """A few tiny steps of `script` on the toy task."""
    data_dir, model_path = toy
    common = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_steps=2", "--batch_size=2",
              "--ckpt_interval=100", "--threads=0"]
    if script == "sft.py":
        return [*common, f"--model_path={model_path}", "--val_records=8", "--eval_interval=2"]
    return [*common, f"--init_from={model_path}", "--num_generations=2", "--num_contrast=1",
            "--max_new_tokens=6"]


def run_in_process(script, args, monkeypatch):
    """Run `script` as __main__ in this process, its global RNG state restored after."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with torch.random.fork_rng():
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")


def recording_wandb():
    """A stand-in for the wandb module: it records init's keyword arguments and each logged dict."""
    stand_in = types.ModuleType("wandb")
    stand_in.inits = []
    stand_in.logged = []
    stand_in.init = lambda **kwargs: stand_in.inits.append(kwargs)
    stand_in.log = stand_in.logged.append
    return stand_in


@pytest.mark.parametrize("script", ["sft.py", "tgrpo.py"])
def test_wandb_is_never_imported_when_off(script, toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    run_in_process(script, script_args(script, toy, tmp_path / "run"), monkeypatch)
    assert sys.modules["wandb"] is None
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2


@pytest.mark.parametrize("script", ["sft.py", "tgrpo.py"])
def test_wandb_gets_the_config_and_every_metrics_line(script, toy, tmp_path, monkeypatch):
    stand_in = recording_wandb()
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    args = ["--wandb_log=True", "--wandb_project=p", "--wandb_run_name=r"]
    run_in_process(script, [*script_args(script, toy, tmp_path / "run"), *args], monkeypatch)
    [init] = stand_in.inits
    assert init["project"] == "p" and init["name"] == "r"
    assert init["config"]["wandb_log"] is True and init["config"]["max_steps"] == 2
    lines = open(tmp_path / "run" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2
    # compared as JSON text: equal values, and a NaN (a step without a video prompt has no p)
    # equals itself
    assert [json.dumps(logged) for logged in stand_in.logged] == lines
