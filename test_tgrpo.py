"""tgrpo.py: the loss against a naive loop, the clip, zero-variance groups, image/video batches, skipped clips,
bit-exact resume, 2-process DeepSpeed runs, and LoRA (adapters only trained, the reference, checkpoints, resume)."""
import json
import os
import shutil
import numpy as np
import pytest
import torch
import lifecycle
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration
import common as C
import data
import model as M
import sft
import tgrpo
from conftest import ON_RANK_1, RANK_1_CLIPS_FAIL, run_script, run_until_a_model_loads


def naive_loss(logp, old, ref, adv, mask, eps, beta):
    """Eq. 4 written per sample, per token, as the paper states it (sequence-mean normalisation)."""
    per_sample = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if mask[i, t]:
                ratio = torch.exp(logp[i, t] - old[i, t])
                surrogate = torch.min(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[i])
                x = ref[i, t] - logp[i, t]
                terms.append(-(surrogate - beta * (torch.exp(x) - x - 1)))
        per_sample.append(torch.stack(terms).mean())
    return torch.stack(per_sample).mean()


def random_rollout(seed, n=5, t=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(n, t, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(n, t, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.2).float()
    mask[:, 0] = 1
    return logp, old, ref, torch.randn(n, generator=g), mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_naive_per_token_loop(seed, monkeypatch):
    monkeypatch.setattr(tgrpo, "epsilon", 0.2)
    monkeypatch.setattr(tgrpo, "beta", 0.04)
    monkeypatch.setattr(tgrpo, "loss_norm", "sequence")
    logp, old, ref, adv, mask = random_rollout(seed)
    ours, stats = tgrpo.tgrpo_loss(logp, old, ref, adv, mask)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    naive = naive_loss(logp, old, ref, adv, mask, 0.2, 0.04)
    (grad_naive,) = torch.autograd.grad(naive, logp)
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(grad_ours, grad_naive)
    assert 0 < stats["clip_fraction"] < 1 and stats["kl"] > 0


def test_token_level_normalisation(monkeypatch):
    monkeypatch.setattr(tgrpo, "loss_norm", "token")
    logp, old, ref, adv, mask = random_rollout(3)
    ours, _ = tgrpo.tgrpo_loss(logp, old, ref, adv, mask)
    ratio = torch.exp(logp - old)
    surrogate = torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.2) * adv[:, None])
    x = ref - logp
    expected = (-(surrogate - 0.04 * (torch.exp(x) - x - 1)) * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, expected)


def test_clipped_tokens_get_no_policy_gradient(monkeypatch):
    """With old != current policy the ratio departs from 1; where the clip binds, only the KL term has gradient."""
    monkeypatch.setattr(tgrpo, "beta", 0.0)
    logp = torch.zeros(2, 3, requires_grad=True)
    old = torch.tensor([[0.0, -0.5, 0.5], [0.0, -0.5, 0.5]])   # ratios 1, e^0.5 = 1.65, e^-0.5 = 0.61
    adv = torch.tensor([1.0, -1.0])
    loss, stats = tgrpo.tgrpo_loss(logp, old, logp.detach(), adv, torch.ones(2, 3))
    (grad,) = torch.autograd.grad(loss, logp)
    # A > 0 clips the high ratio, A < 0 the low one; the other tokens keep their gradient
    assert grad[0, 1] == 0 and grad[1, 2] == 0
    assert grad[0, 0] != 0 and grad[0, 2] != 0 and grad[1, 0] != 0 and grad[1, 1] != 0
    assert stats["clip_fraction"] == pytest.approx(2 / 6)


def test_one_iteration_has_ratio_exactly_one(monkeypatch):
    logp, _, ref, adv, mask = random_rollout(4)
    loss, stats = tgrpo.tgrpo_loss(logp, logp.detach(), ref, adv, mask)
    assert stats["clip_fraction"] == 0
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def load_examples(toy, kinds, n_each=2):
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu")
    records, _ = data.load_records(os.path.join(data_dir, "rl.json"))
    picked = []
    for kind in kinds:
        picked += [r for r in records if r["data_type"] == kind][:n_each]
    return net, tok, picked


def ordered_batch(batch, rows, ids, mask):
    """The rows the loss sees, as tgrpo.py's loop selects them: the ordered ones."""
    keep = tgrpo.ordered_rows(rows)
    return batch.select(keep), ids[keep], mask[keep], keep


def test_image_only_batch_has_no_shuffled_rollouts(toy, monkeypatch):
    monkeypatch.setattr(tgrpo, "max_new_tokens", 4)
    net, tok, records = load_examples(toy, ["image"], 3)
    examples, rows, batch, ids, mask, skipped = tgrpo.rollout(net, records, tok, 0, "cpu")
    assert len(rows) == 3 * tgrpo.num_generations and not any(shuffled for _, shuffled in rows)
    assert all(example.contrast_clip is None for example in examples)
    lengths = mask.sum(1).tolist()
    stats = tgrpo.step_stats(tgrpo.score(examples, rows, tok.batch_decode(ids), lengths), rows, lengths)
    assert stats["p"] == [] and stats["bonus_granted"] == [] and set(stats["temporal_bonus"]) == {0.0}
    assert len(batch.clips) == 3  # each image encoded once for its 8 rows


def test_mixed_batch_rows_and_clips(toy, monkeypatch):
    monkeypatch.setattr(tgrpo, "max_new_tokens", 4)
    net, tok, records = load_examples(toy, ["video", "image"], 2)
    examples, rows, batch, ids, mask, _ = tgrpo.rollout(net, records, tok, 0, "cpu")
    G, Gs = tgrpo.num_generations, tgrpo.num_contrast
    assert len(rows) == 4 * G + 2 * Gs and sum(s for _, s in rows) == 2 * Gs
    assert len(batch.clips) == 2 * 2 + 2  # videos: ordered + shuffled clip each; images: one
    lengths = mask.sum(1).tolist()
    stats = tgrpo.step_stats(tgrpo.score(examples, rows, tok.batch_decode(ids), lengths), rows, lengths)
    assert len(stats["p"]) == 2 and len(stats["accuracy"]) == 4 * G
    # a rank without rollouts logs the same keys
    assert tgrpo.step_stats(tgrpo.score([], [], [], []), [], []) == {k: [] for k in stats}
    sub, sub_ids, sub_mask, keep = ordered_batch(batch, rows, ids, mask)
    assert len(keep) == 4 * G and sub.input_ids.shape[0] == sub_ids.shape[0] == 4 * G


@pytest.mark.parametrize("filtering", [False, True])
def test_filter_groups_drops_the_groups_without_advantage(toy, monkeypatch, filtering):
    """Two video prompts: group 0's ordered answers are all wrong (zero advantages), group 1's mixed. Under
    filter_groups the update keeps group 1's G rows only, and a step whose groups are all uniform trains on the
    placeholder; groups_uniform is logged either way."""
    monkeypatch.setattr(tgrpo, "max_new_tokens", 3)
    monkeypatch.setattr(tgrpo, "filter_groups", filtering)
    net, tok, records = load_examples(toy, ["video"], 2)
    out = tgrpo.rollout(net, records, tok, 0, "cpu")
    G, Gs = tgrpo.num_generations, tgrpo.num_contrast
    right = records[1]["process"] + records[1]["solution"]
    wrong = "<think>x</think><answer>zzz</answer>"
    # rows: G ordered, Gs shuffled of prompt 0, then of prompt 1
    texts = [wrong] * (G + Gs) + [right] * (G // 2) + [wrong] * (G // 2 + Gs)
    scores = tgrpo.score(out.examples, out.rows, texts, [3] * len(texts))
    assert scores.uniform == [1.0, 0.0]
    assert tgrpo.step_stats(scores, out.rows, [3] * len(texts))["groups_uniform"] == [1.0, 0.0]
    chosen = tgrpo.update_batch(net, out, scores, "cpu")
    kept = tgrpo.ordered_rows(out.rows)
    if filtering:
        kept = [b for b in kept if out.rows[b].prompt == 1]
    assert torch.equal(chosen.ids, out.ids[kept]) and not chosen.placeholder
    assert chosen.advantages.tolist() == pytest.approx(scores.advantages[kept].tolist())

    all_wrong = tgrpo.score(out.examples, out.rows, [wrong] * len(texts), [3] * len(texts))
    assert tgrpo.update_batch(net, out, all_wrong, "cpu").placeholder == filtering


def test_zero_variance_groups_give_zero_advantages_and_finite_loss(toy):
    net, tok, records = load_examples(toy, ["video"], 1)
    record = records[0]
    answer = record["process"] + record["solution"]
    G, Gs = tgrpo.num_generations, tgrpo.num_contrast
    examples = [data.Example(record, None, None, object())]
    rows = [tgrpo.Row(0, False)] * G + [tgrpo.Row(0, True)] * Gs
    for texts in ([answer] * (G + Gs), ["nothing"] * (G + Gs)):   # all correct, then all wrong
        scores = tgrpo.score(examples, rows, texts, [10] * (G + Gs))
        rewards_, advantages = scores.reward, scores.advantages
        stats = tgrpo.step_stats(scores, rows, [10] * (G + Gs))
        assert np.all(advantages == 0) and np.all(np.isfinite(rewards_))
        logp = torch.randn(G, 5, requires_grad=True)
        loss, _ = tgrpo.tgrpo_loss(logp, logp.detach(), logp.detach() + 0.1,
                                   torch.tensor(advantages[:G], dtype=torch.float32), torch.ones(G, 5))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert stats["p"] == [0.0] and stats["bonus_granted"] == [1.0] and set(stats["temporal_bonus"]) == {0.0}


@pytest.mark.parametrize("temporal, paid", [(True, 0.3), (False, 0.0)])
def test_ordered_rows_beating_shuffled_earn_the_bonus_unless_plain_grpo(toy, monkeypatch, temporal, paid):
    """p = 0.75 >= p~ = 0: the bonus goes to the 3 right ordered rows; plain GRPO measures p and p~ but pays nothing."""
    monkeypatch.setattr(tgrpo, "temporal", temporal)
    _, _, (record,) = load_examples(toy, ["video"], 1)
    right, wrong = record["process"] + record["solution"], "<think>x</think><answer>zzz</answer>"
    examples = [data.Example(record, None, None, object())]
    rows = [tgrpo.Row(0, False)] * 4 + [tgrpo.Row(0, True)] * 2
    scores = tgrpo.score(examples, rows, [right, right, right, wrong, wrong, wrong], [5] * 6)
    accuracy, rewards_, stats = scores.accuracy, scores.reward, tgrpo.step_stats(scores, rows, [5] * 6)
    assert accuracy.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # contrast rows too
    assert stats["p"] == [0.75] and stats["p_contrast"] == [0.0] and stats["bonus_granted"] == [1.0]
    assert rewards_[:4].tolist() == pytest.approx([2.0 + paid] * 3 + [1.0])
    assert set(stats["temporal_bonus"]) == {paid, 0.0}
    scores = tgrpo.score(examples, rows, [right, wrong, wrong, wrong, right, right], [5] * 6)
    rewards_, stats = scores.reward, tgrpo.step_stats(scores, rows, [5] * 6)
    assert stats["bonus_granted"] == [0.0] and rewards_[0] == pytest.approx(2.0)  # p = 0.25 < p~ = 1


@pytest.mark.parametrize("strict", [False, True])
def test_strict_contrast_pays_no_ties_and_the_mixed_grant_rate(toy, monkeypatch, strict):
    """p = p~ = 0.5: the paper's rule pays the 2 right ordered rows, the strict one nothing. The grant rate over
    the groups where a bonus can matter leaves out a group with every ordered answer wrong."""
    monkeypatch.setattr(tgrpo, "strict_contrast", strict)
    _, _, (record,) = load_examples(toy, ["video"], 1)
    right, wrong = record["process"] + record["solution"], "<think>x</think><answer>zzz</answer>"
    examples = [data.Example(record, None, None, object())] * 2
    rows = ([tgrpo.Row(0, False)] * 4 + [tgrpo.Row(0, True)] * 2
            + [tgrpo.Row(1, False)] * 4 + [tgrpo.Row(1, True)] * 2)
    texts = [right, right, wrong, wrong, right, wrong] + [wrong] * 6   # group 1: p = p~ = 0
    scores = tgrpo.score(examples, rows, texts, [5] * 12)
    paid = 0.3
    if strict:
        paid = 0.0
    assert scores.temporal_bonus[:4].tolist() == pytest.approx([paid, paid, 0, 0])
    assert scores.bonus_granted == [float(not strict), float(not strict)]
    assert scores.bonus_granted_mixed == [float(not strict)]   # group 1 has no correct answer
    assert set(scores.temporal_bonus[6:]) == {0.0}


def test_credit_scales_each_correct_rows_bonus(toy):
    _, _, (record,) = load_examples(toy, ["video"], 1)
    right, wrong = record["process"] + record["solution"], "<think>x</think><answer>zzz</answer>"
    examples = [data.Example(record, None, None, object())]
    rows = [tgrpo.Row(0, False)] * 4 + [tgrpo.Row(0, True)] * 2
    credit = np.array([0.5, 0.0, 1.0, 0.7, 0.0, 0.0])
    scores = tgrpo.score(examples, rows, [right, right, wrong, right, wrong, wrong], [5] * 6, credit)
    assert scores.temporal_bonus[:4].tolist() == pytest.approx([0.15, 0.0, 0.0, 0.21])
    assert scores.credit == pytest.approx([0.5, 0.0, 1.0, 0.7])


def test_response_credit_equals_a_hand_computation(toy, monkeypatch):
    """Each ordered video row's credit from its own log-probs on the ordered and the shuffled clip, row by row;
    0 for contrast rows and for images."""
    monkeypatch.setattr(tgrpo, "max_new_tokens", 5)
    monkeypatch.setattr(tgrpo, "num_generations", 3)
    monkeypatch.setattr(tgrpo, "num_contrast", 2)
    net, tok, records = load_examples(toy, ["video", "image"], 1)
    out = tgrpo.rollout(net, records, tok, 0, "cpu")
    credit = tgrpo.response_credit(net, out)
    shuffled_clip = {row.prompt: out.batch.row_clip[b] for b, row in enumerate(out.rows) if row.contrast}
    hand = []
    for b, row in enumerate(out.rows):
        is_video = row.prompt in shuffled_clip
        if row.contrast or not is_video:
            hand.append(0.0)
            continue
        one = out.batch.select([b])
        on_shuffled = M.PromptBatch(**{**vars(one), "row_clip": [shuffled_clip[row.prompt]]})
        with torch.no_grad():
            ordered = M.completion_logprobs(net, one, out.ids[[b]], out.mask[[b]])[0]
            shuffled = M.completion_logprobs(net, on_shuffled, out.ids[[b]], out.mask[[b]])[0]
        tokens = out.mask[b].bool()
        gain = (ordered[tokens] - shuffled[tokens]).double().mean().item()
        hand.append(min(1.0, max(0.0, gain)))
    assert len(out.rows) == 3 + 2 + 3 and credit.tolist() == pytest.approx(hand, abs=1e-5)
    assert any(0 < c < 1 for c in hand)  # the clip does not hide the computation (seed 0: one row)
    assert credit[[b for b, row in enumerate(out.rows) if row.contrast]].tolist() == [0.0, 0.0]


def test_without_contrast_rollouts_no_contrast_clip_is_built(toy, monkeypatch):
    monkeypatch.setattr(tgrpo, "num_contrast", 0)
    monkeypatch.setattr(tgrpo, "max_new_tokens", 2)
    net, tok, records = load_examples(toy, ["video"], 1)
    examples, rows, batch, *_ = tgrpo.rollout(net, records, tok, 0, "cpu")
    assert not any(s for _, s in rows) and len(batch.clips) == 1


def tgrpo_args(toy, out_dir, *args):
    """The tests' tgrpo.py arguments: 4 steps of 2 prompts, G = 4, G~ = 2, 6 new tokens, and `args`."""
    data_dir, model_path = toy
    return [f"--data_dir={data_dir}", f"--init_from={model_path}", f"--out_dir={out_dir}", "--max_steps=4",
            "--batch_size=2", "--num_generations=4", "--num_contrast=2", "--max_new_tokens=6", "--lr=1e-3",
            "--ckpt_interval=100", *args]


def run_tgrpo(toy, out_dir, *args, nproc=1, rl_json=None, stdout=None, before="", timeout=300):
    """metrics.jsonl of a tgrpo.py run (its stdout and stderr appended to the list `stdout` when given)."""
    code, output = run_script("tgrpo.py", *tgrpo_args(toy, out_dir, *args),
                              *([f"--train_json={rl_json}"] if rl_json else []), nproc=nproc, before=before,
                              timeout=timeout)
    assert code == 0, output[-6000:]
    if stdout is not None:
        stdout.append(output)
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_resume_is_bit_exact(toy, tmp_path):
    straight = run_tgrpo(toy, tmp_path / "a")
    run_tgrpo(toy, tmp_path / "b", "--run_steps=2")
    for name in ("metrics.jsonl", "samples.jsonl"):  # step 3 logged, then a kill before its checkpoint: redone
        with open(tmp_path / "b" / name, "a") as f:
            f.write('{"step": 3, "reward": 9.0}\n{"step": 4, "rew')
    resumed = run_tgrpo(toy, tmp_path / "b", "--resume=True")
    assert [json.loads(line)["step"] for line in open(tmp_path / "b" / "samples.jsonl")] == []  # sample_interval 10
    a = load_file(tmp_path / "a" / "step_000004" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step_000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ["step", "reward", "accuracy", "format", "temporal_bonus", "loss", "kl", "response_length"]
    assert [[m[k] for k in keys] for m in straight] == [[m[k] for k in keys] for m in resumed]

    # with another KL reference (init_from) or contrast count, refused before any model loads; another lr is taken
    ckpt = tmp_path / "b" / "step_000004"
    resume = ["tgrpo.py", *tgrpo_args(toy, tmp_path / "b"), "--resume=True", "--max_steps=6"]
    lines, notes = run_until_a_model_loads([[*resume, f"--init_from={tmp_path / 'a'}"], [*resume, "--num_contrast=0"],
                                            [*resume, "--lr=0.002"]])
    differ = f"tgrpo.py {{}} -> ValueError cannot resume {ckpt} with other values of the keys that define the run: "
    assert lines[0].startswith(differ.format(f"--init_from={tmp_path / 'a'}") +
                               f"init_from '{toy[1]}' in the checkpoint, "
                               f"'{tmp_path / 'a' / 'step_000004'}' now. "), lines[0]
    assert lines[1].startswith(differ.format("--num_contrast=0") + "num_contrast 2 in the checkpoint, 0 now. ")
    assert lines[2] == "tgrpo.py --lr=0.002 -> SystemExit a model was loaded"
    assert f"resuming {ckpt} with changed settings: max_steps 4 -> 6, lr 0.001 -> 0.002" in notes


@pytest.mark.slow
def test_a_resume_refuses_a_start_whose_latest_has_moved(toy, tmp_path):
    """init_from names an SFT run folder; run.json keeps the checkpoint its `latest` named at the start, so a resume
    after the SFT run went on (latest moved) is refused, and resuming with that checkpoint's path is taken."""
    sft = tmp_path / "sft"
    for step in ("step_000001", "step_000002"):
        shutil.copytree(toy[1], sft / step)
    (sft / "latest").write_text("step_000001")
    run_tgrpo(toy, tmp_path / "b", f"--init_from={sft}", "--max_steps=1", "--ckpt_interval=1")
    (sft / "latest").write_text("step_000002")
    ckpt = tmp_path / "b" / "step_000001"
    resume = ["tgrpo.py", *tgrpo_args(toy, tmp_path / "b"), "--resume=True", "--max_steps=2"]
    pinned = sft / "step_000001"
    lines, _ = run_until_a_model_loads([[*resume, f"--init_from={sft}"], [*resume, f"--init_from={pinned}"]])
    assert lines[0].startswith(f"tgrpo.py --init_from={sft} -> ValueError cannot resume {ckpt} with other values of "
                               f"the keys that define the run: init_from '{pinned}' in the checkpoint, "
                               f"'{sft / 'step_000002'}' now. "), lines[0]
    assert lines[1] == f"tgrpo.py --init_from={pinned} -> SystemExit a model was loaded"


@pytest.mark.slow
def test_a_clip_that_fails_mid_run_is_skipped_and_counted(toy, tmp_path):
    data_dir, _ = toy
    records = json.load(open(os.path.join(data_dir, "rl.json")))
    for r in records:
        r["path"] = os.path.join(data_dir, r["path"])
    records[0]["path"] = str(tmp_path / "gone.mp4")           # missing
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    records[1]["path"] = str(tmp_path / "broken.mp4")         # undecodable
    rl_json = tmp_path / "rl.json"
    nan_truth = dict(records[2], solution="<answer>nan</answer>", problem_type="numerical")
    rl_json.write_text(json.dumps(records + [nan_truth]))
    stdout = []
    metrics = run_tgrpo(toy, tmp_path / "out", "--skip_bad=True", "--max_steps=24", "--run_steps=12", "--seed=1",
                        rl_json=rl_json, stdout=stdout)
    skipped = sum(m["skipped"] for m in metrics)
    assert skipped >= 1 and all(np.isfinite(m["loss"]) for m in metrics)
    assert all(m["skipped_at_load"] == 1 for m in metrics)  # the nan ground truth, at load
    assert f"done: steps 1-12; skipped 1 bad records at load, {skipped:g} examples in steps" in stdout[0]
    # without skip_bad the nan ground truth stops the run at load, naming file, record and field ...
    named = rf"{rl_json} record {len(records)} \(problem_id {nan_truth['problem_id']}\)"
    with pytest.raises(AssertionError, match=f"{named}: 'solution' answer 'nan'"):
        run_tgrpo(toy, tmp_path / "strict", "--max_steps=24", "--run_steps=12", "--seed=1", rl_json=rl_json)
    rl_json.write_text(json.dumps(records))  # ... and a bad clip in a step, naming the JSON file, record and clip
    with pytest.raises(AssertionError, match=rf"{rl_json} record [01] \(problem_id \d+\): .*(gone|broken).mp4"):
        run_tgrpo(toy, tmp_path / "strict", "--max_steps=24", "--run_steps=12", "--seed=1", rl_json=rl_json)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["configs/ds_zero2.json", "configs/ds_zero3.json", "configs/ds_zero3_offload.json"])
def test_two_process_deepspeed_runs_stay_in_sync(rl_ready, tmp_path, zero):
    """2 ranks under gloo (conftest checks that the ranks' weights stay equal). ZeRO-3 with parameters and optimizer
    offloaded to the CPU runs here too (torch's AdamW as the client optimizer: no C++ op to build)."""
    metrics = run_tgrpo(rl_ready, tmp_path, f"--deepspeed={zero}", "--max_steps=2", "--max_new_tokens=20", nproc=2)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics) and metrics[-1]["grad_norm"] > 0
    trained = load_file(tmp_path / "step_000002" / "model.safetensors")
    start = load_file(os.path.join(rl_ready[1], "model.safetensors"))
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k].float(), start[k].float()) for k in start)


@pytest.mark.slow
def test_policy_old_policy_and_reference_share_one_precision(toy, monkeypatch):
    """Under bf16 autocast (CPU here, as on a GPU), before any update the KL to an identical reference is exactly 0
    and the ratio exactly 1: all three log-prob passes run in the same regime."""
    monkeypatch.setattr(M, "autocast", lambda device: torch.autocast("cpu", torch.bfloat16))
    monkeypatch.setattr(tgrpo, "num_iterations", 2)
    monkeypatch.setattr(tgrpo, "beta", 0.04)
    monkeypatch.setattr(tgrpo, "max_new_tokens", 6)
    policy, tok, records = load_examples(toy, ["video"], 1)
    ref, _ = lifecycle.load_model(toy[1], "cpu")
    opt = tgrpo.common.Optimizer(policy, 0.0, 0.0, 1.0)  # lr 0: the weights stay, so both updates start at pi_old
    _, rows, batch, ids, mask, _ = tgrpo.rollout(policy, records, tok, 0, "cpu")
    sub, sub_ids, sub_mask, keep = ordered_batch(batch, rows, ids, mask)
    stats = tgrpo.train_step(opt, policy, ref, sub, sub_ids, sub_mask, torch.randn(len(keep)), 0.0)
    assert stats["kl"] == 0.0 and stats["clip_fraction"] == 0.0


def test_correct_threshold_decides_the_length_bonus_too(monkeypatch):
    monkeypatch.setattr(tgrpo, "length_bonus", True)
    record = {"solution": "<answer>red blue</answer>", "problem_type": "OCR"}
    half = "<think>x</think><answer>red</answer>"  # accuracy 1 - WER = 0.5
    examples, rows = [data.Example(record, None, None, None)], [tgrpo.Row(0, False)] * 2
    for threshold, paid in ((0.5, 0.2), (0.9, 0.0)):
        monkeypatch.setattr(tgrpo, "correct_threshold", threshold)
        stats = tgrpo.step_stats(tgrpo.score(examples, rows, [half, "nothing"], [400, 400]), rows, [400, 400])
        assert stats["length_bonus"] == [paid, 0.0]


@pytest.mark.slow
def test_every_paper_config_loads_and_enumerations_are_checked(tmp_path):
    config = {k: v for k, v in vars(tgrpo).items()}
    tgrpo.common.configure(config, ["configs/tgrpo_paper.py", "configs/tgrpo_official.py"],
                           choices={"temporal_rule": tuple(tgrpo.rewards.RULES)})
    assert config["temporal_rule"] == "official" and config["mu"] == 0.8 and config["num_contrast"] == 4
    import sft
    tgrpo.common.configure(dict(vars(sft)), ["configs/sft_paper.py"])
    for name in ("lora_1gpu", "lora_multi", "lora_3b"):  # each on top of the paper config
        config = tgrpo.common.configure(dict(vars(tgrpo)), ["configs/tgrpo_paper.py", f"configs/tgrpo_{name}.py"])
        assert config["lora_rank"] == 64 and config["out_dir"] == f"out/tgrpo_{name}" and lifecycle.lora_config(config)
    # each bad value refused by tgrpo.py's own start (one process for all: a start imports for
    # ~7 s), with an error that names the key, before any model loads
    bads = ("--temporal_rule=x", "--mu=abc", "--correct_threshold=high", "--bonus_to=x",
            "--loss_norm=x")
    argvs = [["tgrpo.py", "--init_from=/nonexistent", bad] for bad in bads]
    lines, _ = run_until_a_model_loads(argvs)
    for bad, line in zip(bads, lines):
        error = line.split(" -> ", 1)[1]
        assert not error.startswith("SystemExit") and bad[2:].split("=")[0] in error, line


@pytest.mark.parametrize("bonus_to, scale, acts", [("reward", True, False), ("advantage", True, True),
                                                   ("reward", False, True)])
def test_the_bonus_acts_only_in_the_variants_on_binary_groups(monkeypatch, bonus_to, scale, acts):
    """A multiple-choice group with one format reward: eq. 2-3 void the granted bonus, both variants keep it."""
    monkeypatch.setattr(tgrpo, "bonus_to", bonus_to)
    monkeypatch.setattr(tgrpo, "scale_rewards", scale)
    record = {"solution": "<answer>B</answer>", "problem_type": "multiple choice"}
    right, wrong = "<think>x</think><answer>B</answer>", "<think>x</think><answer>C</answer>"
    examples = [data.Example(record, None, None, object())]
    rows = [tgrpo.Row(0, False)] * 4 + [tgrpo.Row(0, True)] * 2
    scores = tgrpo.score(examples, rows, [right, right, wrong, wrong, wrong, wrong], [5] * 6)
    stats = tgrpo.step_stats(scores, rows, [5] * 6)
    assert stats["bonus_granted"] == [1.0] and (stats["advantage_change"][0] > 0.1) == acts
    assert stats["advantage_change"][0] < 1e-4 or acts


RANK_1_STOPS_AT_ONCE = ON_RANK_1 + "import model; model.stop_ids = lambda tokenizer: list(range(len(tokenizer)))"


@pytest.mark.slow
@pytest.mark.parametrize("rank_1", [RANK_1_STOPS_AT_ONCE, RANK_1_CLIPS_FAIL], ids=["stops_at_once", "clips_fail"])
def test_zero3_ranks_out_of_step_in_the_rollout(toy, tmp_path, rank_1):
    """ZeRO-3 with every weight partitioned, 2 ranks whose rollouts differ: rank 1's rows all stop at their first
    token (every token is a stop token there) while rank 0's run 6 tokens, or rank 1's clips all fail (skip_bad)
    and it has nothing to generate. ZeRO-3's per-module hooks made every layer call a collective, so the ranks fell
    out of step (SIGABRT or a hang, killed by the timeout); they are removed for the whole rollout phase, which
    every rank enters, and a rank without data trains on a placeholder row at zero loss."""
    ds = json.load(open("configs/ds_zero3.json"))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    metrics = run_tgrpo(toy, tmp_path / "out", f"--deepspeed={tmp_path / 'zero3.json'}", "--max_steps=2",
                        "--skip_bad=True", nproc=2, before=rank_1, timeout=240)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    if rank_1 == RANK_1_STOPS_AT_ONCE:  # the mean of rank 1's 1 token and rank 0's more
        assert all(1 < m["response_length"] <= 3.5 for m in metrics) and sum(m["skipped"] for m in metrics) == 0
    else:
        assert [m["skipped"] for m in metrics] == [2, 2] and all(m["response_length"] > 1 for m in metrics)


@pytest.mark.slow
def test_paper_config_runs_without_torchrun(toy, tmp_path):
    """`python tgrpo.py configs/tgrpo_paper.py` in one process: every key of the paper config exists, and DeepSpeed
    ZeRO-3 gets a 1-process group rather than looking for MPI. Only the data, model and sizes are the tiny ones."""
    data_dir, model_path = toy
    code, output = run_script("tgrpo.py", "configs/tgrpo_paper.py", f"--init_from={model_path}",
                              f"--train_json={data_dir}/rl.json", "--media_root=", f"--out_dir={tmp_path}",
                              "--max_steps=1", "--max_new_tokens=4", "--num_generations=2", "--num_contrast=1")
    assert code == 0, output[-6000:]
    assert os.path.isfile(tmp_path / "step_000001" / "model.safetensors")


LORA = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=tgrpo.lora_targets, lora_merger=True)


@pytest.fixture(scope="session")
def rl_ready(toy, tmp_path_factory):
    """The tiny model taught the answer format on 8 short targets, "<think>ok</think>" and a letter A-D in turn, so
    that its rollouts earn rewards that differ within a group and T-GRPO has real gradients: the untrained model's
    rewards are all 0, which leaves only weight decay acting."""
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu")
    records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
    short = [dict(r, process="<think>ok</think>", solution=f"<answer>{'ABCD'[i % 4]}</answer>")
             for i, r in enumerate(records[:8])]
    sft_batch = sft.make_batch(net, short, tok, "cpu")
    batch, ids, mask = sft_batch.prompts, sft_batch.target_ids, sft_batch.target_mask
    opt, threads = torch.optim.AdamW(net.parameters(), lr=3e-3), torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: one thread is several times faster than two
    for _ in range(150):
        sft.sft_loss(net, batch, ids, mask).backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("rl_ready"))
    net.save_pretrained(path)
    tok.save_pretrained(path)
    return data_dir, path


def lora_model_and_rollout(toy, monkeypatch, prompts=2):
    """A LoRA policy (adapters on the language model, a trainable merger copy) and its ordered rollouts."""
    monkeypatch.setattr(tgrpo, "max_new_tokens", 6)
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu", lora=lifecycle.lora_config(LORA))
    records, _ = data.load_records(os.path.join(data_dir, "rl.json"))
    examples, rows, batch, ids, mask, _ = tgrpo.rollout(net.eval(), records[:prompts], tok, 0, "cpu")
    return net, tok, ordered_batch(batch, rows, ids, mask)[:3]


def test_lora_trains_only_adapters_and_its_reference_is_the_base_model(toy, monkeypatch):
    net, _, (batch, ids, mask) = lora_model_and_rollout(toy, monkeypatch)
    layers = M.unwrap(net).config.text_config.num_hidden_layers
    assert len(net.targeted_module_names) == 7 * layers  # q, k, v, o, gate, up, down of every layer, no vision module
    assert all(name.startswith("model.language_model.layers.") for name in net.targeted_module_names)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    opt = C.Optimizer(net, 1e-2, 0.01, 5.0)
    advantages = torch.randn(len(ids), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        tgrpo.train_step(opt, net.train(), net, batch, ids, mask, advantages, 1e-2)
    trained = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
    assert {k for k in trained if ".lora_B." in k} and {k for k in trained if ".modules_to_save." in k}
    assert all(".lora_" in k or ".modules_to_save." in k for k in trained)  # every base weight bit-identical
    base, _ = lifecycle.load_model(toy[1], "cpu")
    with torch.no_grad():
        with net.eval().disable_adapter():
            reference = M.completion_logprobs(net, batch, ids, mask)
        assert torch.equal(reference, M.completion_logprobs(base.eval(), batch, ids, mask))
        assert (reference - M.completion_logprobs(net, batch, ids, mask)).abs().max() > 1e-3  # adapters on: not it


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapter_and_a_merged_folder(toy, monkeypatch, tmp_path):
    net, tok, (batch, ids, mask) = lora_model_and_rollout(toy, monkeypatch)
    g = torch.Generator().manual_seed(0)
    for p in (p for p in net.parameters() if p.requires_grad):  # lora_B starts at 0: make the adapters do something
        p.data += 0.1 * torch.randn(p.shape, generator=g)
    step = lifecycle.save_checkpoint(str(tmp_path), 1, tok, C.Optimizer(net, 1e-3, 0.0, 1.0), {"lora_rank": 4}, 0)
    logprobs = lambda model: M.completion_logprobs(model.eval(), batch, ids, mask)
    with torch.no_grad():
        policy = logprobs(net)
        merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(step)  # plain transformers
        torch.testing.assert_close(logprobs(merged), policy, atol=1e-5, rtol=0)
        assert (logprobs(merged) - logprobs(lifecycle.load_model(toy[1], "cpu")[0])).abs().max() > 1e-3
        peft_model = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy[1]),
                                               os.path.join(step, lifecycle.ADAPTER))
        assert torch.equal(logprobs(peft_model), policy)
        eval_model, _ = lifecycle.load_model(os.path.join(step, lifecycle.ADAPTER), "cpu")  # eval.py's way: base + adapter, merged
        torch.testing.assert_close(logprobs(eval_model), policy, atol=1e-5, rtol=0)


LORA_ARGS = ("--lora_rank=4", "--lora_merger=True", "--max_new_tokens=20", "--seed=1")
ZERO2 = "--deepspeed=configs/ds_zero2.json"


@pytest.fixture(scope="module")
def lora_zero2(rl_ready, tmp_path_factory):
    """A 4-step LoRA run under ZeRO-2 on 2 ranks: (run folder, metrics). Two tests read it (each
    2-rank run costs three processes' start-up): test_lora_resume_is_bit_exact's uninterrupted run
    and test_lora_under_zero3_equals_zero2's ZeRO-2 side."""
    out_dir = tmp_path_factory.mktemp("lora") / "zero2"
    return out_dir, run_tgrpo(rl_ready, out_dir, *LORA_ARGS, ZERO2, nproc=2)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,extra", [(1, ()), (2, (ZERO2,))])
def test_lora_resume_is_bit_exact(rl_ready, tmp_path, request, nproc, extra):
    """A LoRA run resumed from its adapter (on the base it started from) and optimizer state continues bit-exactly."""
    args = (*LORA_ARGS, *extra)
    if nproc == 2:  # the same command as lora_zero2's: its run
        straight_dir, straight = request.getfixturevalue("lora_zero2")
    else:
        straight_dir = tmp_path / "a"
        straight = run_tgrpo(rl_ready, straight_dir, *args)
    run_tgrpo(rl_ready, tmp_path / "b", "--run_steps=2", *args, nproc=nproc)
    resumed = run_tgrpo(rl_ready, tmp_path / "b", "--resume=True", *args, nproc=nproc)
    keys = ["step", "reward", "accuracy", "format", "loss", "kl", "grad_norm"]
    assert [[m[k] for k in keys] for m in straight] == [[m[k] for k in keys] for m in resumed]
    assert max(m["grad_norm"] for m in straight) > 0 and max(m["kl"] for m in straight) > 0  # it really trained
    a, b = (load_file(run / "step_000004" / lifecycle.ADAPTER / "adapter_model.safetensors")
            for run in (straight_dir, tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in a.items())


@pytest.mark.slow
def test_lora_under_zero3_equals_zero2(rl_ready, lora_zero2, tmp_path):
    """ZeRO-3 partitions the frozen base too (here every weight: persistence threshold 0), and
    checkpointed layers and head slices recompute with it gathered again. With gradient
    checkpointing, the first update's loss, KL and gradient norm (same rollouts) match ZeRO-2's,
    where every rank holds the whole base: lora_zero2's first step, measured before any update, so
    its 4 steps and its backward without checkpointing give the same numbers (a recompute with a
    wrong base would not)."""
    ds = json.load(open("configs/ds_zero3.json"))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    three = run_tgrpo(rl_ready, tmp_path / "zero3", f"--deepspeed={tmp_path / 'zero3.json'}",
                      *LORA_ARGS, "--max_steps=1", "--grad_ckpt=True", nproc=2)
    two = lora_zero2[1]
    assert two[0]["reward"] == three[0]["reward"] and two[0]["grad_norm"] > 0
    for key in ("loss", "kl", "grad_norm"):
        assert three[0][key] == pytest.approx(two[0][key], rel=1e-4, abs=1e-7), key
    adapter = load_file(tmp_path / "zero3" / "step_000001" / lifecycle.ADAPTER / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # (Adam's first step is sign-like:
    # weights whose gradient is near 0 may move differently, so the update is compared through its gradient norm)
