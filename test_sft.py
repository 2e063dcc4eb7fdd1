"""sft.py: the loss ignores exactly the prompt positions; resume continues bit-exactly (full and LoRA); bad data and
config fail early or are counted; a failed checkpoint write leaves the previous one."""
import errno
import json
import os
import subprocess
import sys
import numpy as np
import pytest
import torch
import lifecycle
from safetensors.torch import load_file
import data
import common as C
import model as M
import sft
from conftest import ON_RANK_1, RANK_1_CLIPS_FAIL, run_script


def test_loss_ignores_exactly_the_prompt_positions(toy):
    """Our SFT loss equals transformers' own loss with labels -100 on every prompt (and padding) position."""
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu")
    records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
    sft_batch = sft.make_batch(net, records[:3], tok, "cpu")  # mixed lengths, left-padded prompts
    batch, ids, mask = sft_batch.prompts, sft_batch.target_ids, sft_batch.target_mask
    ours = sft.sft_loss(net, batch, ids, mask)

    B, P, T = *batch.input_ids.shape, ids.shape[1]
    labels = torch.cat([torch.full((B, P), -100), ids.masked_fill(mask == 0, -100)], dim=1)
    vision = [batch.clips[c] for c in batch.row_clip]
    videos = [c for c in vision if c.is_video]
    images = [c for c in vision if not c.is_video]
    positions = torch.cat([batch.position_ids, (batch.next_pos[:, None] + torch.arange(T)).expand(3, B, T)], dim=2)
    inputs = dict(input_ids=torch.cat([batch.input_ids, ids], 1), position_ids=positions,
                  attention_mask=torch.cat([batch.attention_mask, mask], 1))
    if videos:
        inputs.update(pixel_values_videos=torch.cat([c.pixel_values for c in videos]),
                      video_grid_thw=torch.tensor([c.grid_thw for c in videos]))
    if images:
        inputs.update(pixel_values=torch.cat([c.pixel_values for c in images]),
                      image_grid_thw=torch.tensor([c.grid_thw for c in images]))
    reference = net(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # and the prompt really is excluded: counting its tokens too would give another value
    labels_with_prompt = torch.cat([batch.input_ids.masked_fill(batch.attention_mask == 0, -100), labels[:, P:]], 1)
    with_prompt = net(**inputs, labels=labels_with_prompt).loss
    assert abs(with_prompt.item() - ours.item()) > 1e-3


def test_special_tokens_in_the_target_stay_plain_text(toy):
    """process + solution are data: an <|im_end|> in them must not end the target early; only the appended one does."""
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu")
    record = data.load_records(os.path.join(data_dir, "sft.json"))[0][0]
    record["process"] = "<think>" + "".join(tok.all_special_tokens) + "<|im_end|>so<|video_pad|></think>"
    sft_batch = sft.make_batch(net, [record], tok, "cpu")
    ids, mask = sft_batch.target_ids, sft_batch.target_mask
    target = ids[0, :int(mask.sum())].tolist()
    assert tok.decode(target) == data.sft_target(record) + "<|im_end|>"
    assert [i for i in target if i in tok.all_special_ids] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def run_sft(toy, out_dir, *args, nproc=1, before="", timeout=300):
    """stdout and stderr of an sft.py run, which must succeed."""
    data_dir, model_path = toy
    code, output = run_script("sft.py", f"--data_dir={data_dir}", f"--model_path={model_path}", f"--out_dir={out_dir}",
                              "--max_steps=4", "--batch_size=2", "--grad_accum=2", "--val_records=8",
                              "--eval_interval=2", "--warmup_steps=2", "--ckpt_interval=100", *args, nproc=nproc,
                              before=before, timeout=timeout)
    assert code == 0, output[-6000:]
    return output


def metrics_of(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("lora", [(), ("--lora_rank=4",)])
def test_resume_is_bit_exact(toy, tmp_path, lora):
    stdout = run_sft(toy, tmp_path / "straight", "--resume=True", *lora)  # nothing to resume: said, then from step 0
    assert f"WARNING: resume=True but {tmp_path / 'straight'} holds no checkpoint: starting at step 0" in stdout
    run_sft(toy, tmp_path / "split", "--run_steps=2", *lora)
    assert C.latest_checkpoint(str(tmp_path / "split")).endswith("step_000002")
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # steps 3 and 4 logged, then a kill before their
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n{"step": 5, "lo')  # checkpoint: redone
    run_sft(toy, tmp_path / "split", "--resume=True", *lora)
    start = load_file(os.path.join(toy[1], "model.safetensors"))
    for name in [os.path.join(lifecycle.ADAPTER, "adapter_model.safetensors")] * bool(lora) + ["model.safetensors"]:
        a = load_file(tmp_path / "straight" / "step_000004" / name)
        b = load_file(tmp_path / "split" / "step_000004" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in start)  # it did train (with LoRA: the merged weights)
    read = lambda d: [json.loads(line) for line in open(d / "metrics.jsonl")]
    losses = lambda rows: [(r["step"], r["loss"], r.get("val_loss")) for r in rows]
    assert losses(read(tmp_path / "straight")) == losses(read(tmp_path / "split"))
    run = json.load(open(tmp_path / "split" / "step_000004" / "run.json"))
    assert run["step"] == 4 and run["config"]["batch_size"] == 2


def test_configurator_rejects_unknown_keys_and_wrong_types(tmp_path):
    config = {"lr": 1e-3, "name": "x", "temporal": True, "steps": 4}
    parsed = C.configure(dict(config), ["--lr=1", "--name=run", "--temporal=False"])
    assert parsed == {"lr": 1.0, "name": "run", "temporal": False, "steps": 4}
    (tmp_path / "c.py").write_text("steps = 8\nlr = 2e-5\n")
    assert C.configure(dict(config), [str(tmp_path / "c.py"), "--steps=9"])["steps"] == 9
    for bad, err in [("--lr_rate=1", ValueError), ("--steps=1.5", TypeError), ("--temporal=1", TypeError),
                     ("--lr", ValueError)]:
        try:
            C.configure(dict(config), [bad])
        except err as e:
            assert bad.split("=")[0][2:] in str(e) or "expected" in str(e)
        else:
            raise AssertionError(f"{bad} accepted")


def test_skips_of_every_cause_are_counted(toy, tmp_path):
    """skip_bad: a record without `process` (at load) and a missing clip (in a step) are skipped, each counted in
    metrics.jsonl and in the final line."""
    data_dir, _ = toy
    records = json.load(open(os.path.join(data_dir, "sft.json")))[:20]  # 12 train records: all drawn in 4 steps
    del records[0]["process"]
    records[1]["path"] = "./videos/gone.mp4"
    records[1]["data_type"] = "video"
    cot = tmp_path / "cot.json"
    cot.write_text(json.dumps(records))
    stdout = run_sft(toy, tmp_path / "out", f"--train_json={cot}", f"--media_root={data_dir}", "--skip_bad=True")
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert all(m["skipped_at_load"] == 1 for m in metrics)
    skipped = sum(m["skipped"] for m in metrics)  # record 1 drawn once in each of the two epochs' first 16 draws
    assert skipped >= 1 and metrics[-1]["val_skipped"] == 0
    assert f"done: steps 1-4; skipped 1 bad records at load, {skipped} examples in steps" in stdout


def test_disk_full_during_a_checkpoint(tiny, tmp_path, monkeypatch):
    """A failed write says which checkpoint failed and that the previous one is intact, and leaves no .tmp folder."""
    net, tok, _ = tiny
    opt = C.Optimizer(net, 1e-3, 0.0, 1.0)
    first = lifecycle.save_checkpoint(str(tmp_path), 1, tok, opt, {"lr": 1e-3})
    for err in [OSError(errno.ENOSPC, "No space left on device"),
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")]:
        monkeypatch.setattr(torch, "save", lambda *a, err=err, **k: (_ for _ in ()).throw(err))
        with pytest.raises(RuntimeError) as failure:
            lifecycle.save_checkpoint(str(tmp_path), 2, tok, opt, {"lr": 1e-3})
        assert f"writing {tmp_path / 'step_000002'} failed" in str(failure.value)
        assert f"the previous checkpoint is intact: {first}" in str(failure.value)
        assert sorted(os.listdir(tmp_path)) == ["latest", "step_000001"]
        assert C.latest_checkpoint(str(tmp_path)) == first and lifecycle.load_model(first, "cpu")[0] is not None


HERE = os.path.dirname(os.path.abspath(__file__))
FAIL_FAST = """
import runpy, sys
import lifecycle
def refuse(*args, **kwargs):
    raise SystemExit("a model was loaded")
lifecycle.load_model = refuse
for argv in {cases!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except BaseException as err:
        print(argv[0], argv[1], "->", type(err).__name__, str(err).splitlines()[0], flush=True)
"""


def test_bad_config_and_data_fail_before_any_model_loads(tmp_path):
    """Each case runs a script's __main__ with lifecycle.load_model refused: the error must come from the config or the
    data check, never from a model that was loaded first."""
    (tmp_path / "empty.json").write_text("[]")
    record = {"problem": "?", "solution": "<answer>3</answer>", "path": "x.png", "data_type": "image",
              "problem_type": "numerical", "process": "<think>.</think>"}
    (tmp_path / "few.json").write_text(json.dumps([record] * 3))
    (tmp_path / "no_process.json").write_text(json.dumps([{k: v for k, v in record.items() if k != "process"}] * 3))
    nowhere = {"tgrpo.py": ["--init_from=/nowhere", "--data_dir=/nowhere"], "eval.py": ["--model_path=/nowhere"],
               "sft.py": ["--model_path=/nowhere", "--data_dir=/nowhere"]}  # so the default run's builders stay idle
    cases = {  # (script, argument): the start of the error
        ("tgrpo.py", "--mu=abc"): "TypeError config mu: expected float, got 'abc'",
        ("tgrpo.py", "--correct_threshold=high"): "TypeError config correct_threshold: expected float",
        ("tgrpo.py", "--temporal_rule=x"): "ValueError config temporal_rule: 'x' is not one of ('paper', 'official')",
        ("tgrpo.py", "--attn=fast"): "ValueError config attn: 'fast' is not one of",
        ("tgrpo.py", "--num_generations=1"): "ValueError config num_generations: 1 is not one of range(2,",
        ("sft.py", "--attn=fast"): "ValueError config attn: 'fast' is not one of",
        ("eval.py", "--attn=flash"): "ValueError config attn: 'flash' is not one of",
        ("tgrpo.py", f"--train_json={tmp_path / 'empty.json'}"): "DataError " + str(tmp_path / "empty.json") +
        ": no records to use: the list is empty",
        ("sft.py", f"--train_json={tmp_path / 'few.json'}"): "DataError " + str(tmp_path / "few.json") +
        ": 3 usable records, too few to hold out val_records=64",
        ("sft.py", f"--train_json={tmp_path / 'no_process.json'}"): "DataError " + str(tmp_path / "no_process.json") +
        " record 0: 'process' missing",
    }
    argvs = [[script, arg, *nowhere[script]] for script, arg in cases]
    result = subprocess.run([sys.executable, "-c", FAIL_FAST.format(cases=argvs)], cwd=HERE, capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stdout.splitlines()
    assert len(lines) == len(cases), result.stdout + result.stderr[-3000:]
    for (script, arg), expected, line in zip(cases, cases.values(), lines):
        assert line.startswith(f"{script} {arg} -> {expected}"), line


def test_paper_configs_apply_to_their_scripts():
    """Every key of configs/*.py exists in its script with the right type (a renamed key fails here, not on 8 GPUs)."""
    import tgrpo
    for script, names in ((sft, ["sft_paper.py"]), (tgrpo, ["tgrpo_paper.py", "tgrpo_official.py"])):
        config = C.configure(dict(script.config), [os.path.join(HERE, "configs", name) for name in names])
        assert config["max_prompt_tokens"] == 16384 and config["skip_bad"]


RANK_1_DRIFTS = ON_RANK_1 + ("import common\n    step = common.Optimizer.step\n"
                             "    def drift(self, lr):\n        norm = step(self, lr)\n"
                             "        next(self.model.parameters()).data[0] += 1e-3\n        return norm\n"
                             "    common.Optimizer.step = drift")


@pytest.mark.parametrize("drift", [False, True])
def test_two_plain_torch_ranks_keep_equal_weights(toy, tmp_path, drift):
    """2 ranks without DeepSpeed average gradients by hand (common.Optimizer.step), so their weights stay equal bit
    for bit; conftest's check finds it, and finds a rank whose weights drift (the drift: a stand-in for a bug)."""
    data_dir, model_path = toy
    code, output = run_script("sft.py", f"--data_dir={data_dir}", f"--model_path={model_path}",
                              f"--out_dir={tmp_path}", "--max_steps=2", "--batch_size=2", "--val_records=8", nproc=2,
                              before=RANK_1_DRIFTS if drift else "", timeout=240)
    assert (code != 0 and "ranks out of sync at step 2" in output) if drift else code == 0, output[-3000:]


def test_zero2_rank_whose_clips_all_fail_still_steps(toy, tmp_path):
    """2 ranks under ZeRO-2 with skip_bad, every clip of rank 1 failing: that rank runs forward and backward on a
    placeholder row at zero loss, so DeepSpeed's reduction and step, which need every rank, go through (without
    it: KeyError 0 in ZeRO-2's grad norm). conftest's weight check shows both ranks took the same step."""
    run_sft(toy, tmp_path, "--deepspeed=configs/ds_zero2.json", "--skip_bad=True", "--max_steps=2", nproc=2,
            before=RANK_1_CLIPS_FAIL, timeout=240)
    metrics = metrics_of(tmp_path)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert os.path.isfile(tmp_path / "step_000002" / "model.safetensors")


@pytest.fixture(scope="module")
def accumulated(toy, tmp_path_factory):
    """2 steps of grad_accum 2, a checkpoint each step and only the newest kept whole: plain torch, DeepSpeed ZeRO-2
    and ZeRO-3, each one process started without torchrun. {name: (run folder, metrics)}"""
    root = tmp_path_factory.mktemp("accumulated")
    runs = {}
    for name, ds in (("plain", ""), ("zero2", "configs/ds_zero2.json"), ("zero3", "configs/ds_zero3.json")):
        run_sft(toy, root / name, f"--deepspeed={ds}", "--max_steps=2", "--ckpt_interval=1", "--keep_checkpoints=1",
                "--eval_interval=100")
        runs[name] = root / name, metrics_of(root / name)
    return runs


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_adds_up_micro_batches_as_plain_torch(accumulated, zero):
    """Each micro-batch's backward adds to the step's gradient (DeepSpeed used to keep only the last one's: every
    backward was an accumulation boundary), so grad norms, losses and weights equal plain torch's."""
    (plain_dir, plain), (ds_dir, ds) = accumulated["plain"], accumulated[zero]
    for a, b in zip(plain, ds):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"])
    a = load_file(plain_dir / "step_000002" / "model.safetensors")
    b = load_file(ds_dir / "step_000002" / "model.safetensors")
    # ZeRO-3 sums its partitions in another order: 1.1e-5 apart after two steps; the last-micro-batch bug moved
    # weights by about lr (1e-3) and the grad norm by 2x
    assert all(torch.allclose(a[k], b[k].float(), rtol=0, atol=1e-4) for k in a)


def test_deepspeed_step_folders_load_as_checkpoints(accumulated):
    """DeepSpeed wrote its own `latest` inside step_N, so --init_from=out/x/step_N resolved to step_N/deepspeed."""
    for name in ("zero2", "zero3"):
        run_dir = accumulated[name][0]
        step_dir = str(run_dir / "step_000002")
        assert C.latest_checkpoint(str(run_dir)) == step_dir and C.latest_checkpoint(step_dir) is None
        lifecycle.load_model(C.latest_checkpoint(step_dir) or step_dir, "cpu")


def test_older_checkpoints_keep_only_their_weights(accumulated):
    for name, state in (("plain", "optimizer.pt"), ("zero2", "deepspeed"), ("zero3", "deepspeed")):
        run_dir = accumulated[name][0]
        assert sorted(os.listdir(run_dir)) == ["latest", "metrics.jsonl", "step_000001", "step_000002"]
        assert os.path.exists(run_dir / "step_000002" / state) and not os.path.exists(run_dir / "step_000001" / state)
        lifecycle.load_model(str(run_dir / "step_000001"), "cpu")


def test_keep_checkpoints_deletes_older_ones(tiny, tmp_path):
    net, tok, _ = tiny
    opt = C.Optimizer(net, 1e-3, 0.0, 1.0)
    for step in (1, 2, 3):
        lifecycle.save_checkpoint(str(tmp_path), step, tok, opt, {"keep_checkpoints": 2, "keep_weights": False})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000002", "step_000003"]
    lifecycle.save_checkpoint(str(tmp_path), 1, tok, opt, {"keep_checkpoints": 1})  # a rerun from step 1: keeps
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000001", "step_000002", "step_000003"]
    before = os.stat(tmp_path / "step_000001" / "model.safetensors").st_ino
    lifecycle.save_checkpoint(str(tmp_path), 1, tok, opt, {})  # step 1 written again: replaced whole, no .old or .tmp left
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000001", "step_000002", "step_000003"]
    assert os.stat(tmp_path / "step_000001" / "model.safetensors").st_ino != before
    assert C.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000001")


def test_threads_fix_the_cpu_thread_count():
    before = torch.get_num_threads()
    try:
        assert C.setup_distributed(threads=1) == "cpu" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
