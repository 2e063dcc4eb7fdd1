"""sft.py: the loss ignores exactly the prompt positions; resume continues bit-exactly."""
import json
import os
import subprocess
import sys
import torch
from safetensors.torch import load_file
import data
import common as C
import model as M
import sft


def test_loss_ignores_exactly_the_prompt_positions(toy):
    """Our SFT loss equals transformers' own loss with labels -100 on every prompt (and padding) position."""
    data_dir, model_path = toy
    net, tok = M.load_model(model_path, "cpu")
    records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
    batch, ids, mask, _, _ = sft.make_batch(net, records[:3], tok, "cpu")  # mixed lengths, left-padded prompts
    ours = sft.sft_loss(net, batch, ids, mask)

    B, P, T = *batch.input_ids.shape, ids.shape[1]
    labels = torch.cat([torch.full((B, P), -100), ids.masked_fill(mask == 0, -100)], dim=1)
    vision = [batch.clips[c] for c in batch.row_clip]
    videos = [c for c in vision if c.is_video]
    images = [c for c in vision if not c.is_video]
    positions = torch.cat([batch.position_ids, (batch.next_pos[:, None] + torch.arange(T)).expand(3, B, T)], dim=2)
    kwargs = {}
    if videos:
        kwargs.update(pixel_values_videos=torch.cat([c.pixel_values for c in videos]), video_grid_thw=torch.tensor([c.grid_thw for c in videos]))
    if images:
        kwargs.update(pixel_values=torch.cat([c.pixel_values for c in images]), image_grid_thw=torch.tensor([c.grid_thw for c in images]))
    reference = net(input_ids=torch.cat([batch.input_ids, ids], 1), attention_mask=torch.cat([batch.attention_mask, mask], 1),
                    position_ids=positions, labels=labels, **kwargs).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # and the prompt really is excluded: counting its tokens too would give another value
    labels_with_prompt = torch.cat([batch.input_ids.masked_fill(batch.attention_mask == 0, -100), labels[:, P:]], 1)
    with_prompt = net(input_ids=torch.cat([batch.input_ids, ids], 1), attention_mask=torch.cat([batch.attention_mask, mask], 1),
                      position_ids=positions, labels=labels_with_prompt, **kwargs).loss
    assert abs(with_prompt.item() - ours.item()) > 1e-3


def run_sft(toy, out_dir, *args):
    data_dir, model_path = toy
    cmd = [sys.executable, "sft.py", f"--data_dir={data_dir}", f"--model_path={model_path}", f"--out_dir={out_dir}",
           "--max_steps=4", "--batch_size=2", "--grad_accum=2", "--val_records=8", "--eval_interval=2",
           "--warmup_steps=2", "--ckpt_interval=100", *args]
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True)


def test_resume_is_bit_exact(toy, tmp_path):
    run_sft(toy, tmp_path / "straight")
    run_sft(toy, tmp_path / "split", "--run_steps=2")
    assert C.latest_checkpoint(str(tmp_path / "split")).endswith("step_000002")
    run_sft(toy, tmp_path / "split", "--resume=True")
    a = load_file(tmp_path / "straight" / "step_000004" / "model.safetensors")
    b = load_file(tmp_path / "split" / "step_000004" / "model.safetensors")
    start = load_file(os.path.join(toy[1], "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train
    read = lambda d: [json.loads(line) for line in open(d / "metrics.jsonl")]
    losses = lambda rows: [(r["step"], r["loss"], r.get("val_loss")) for r in rows]
    assert losses(read(tmp_path / "straight")) == losses(read(tmp_path / "split"))
    run = json.load(open(tmp_path / "split" / "step_000004" / "run.json"))
    assert run["step"] == 4 and run["config"]["batch_size"] == 2


def test_configurator_rejects_unknown_keys_and_wrong_types(tmp_path):
    config = {"lr": 1e-3, "name": "x", "temporal": True, "steps": 4}
    assert C.configure(dict(config), ["--lr=1", "--name=run", "--temporal=False"]) == {"lr": 1.0, "name": "run", "temporal": False, "steps": 4}
    (tmp_path / "c.py").write_text("steps = 8\nlr = 2e-5\n")
    assert C.configure(dict(config), [str(tmp_path / "c.py"), "--steps=9"])["steps"] == 9
    for bad, err in [("--lr_rate=1", ValueError), ("--steps=1.5", TypeError), ("--temporal=1", TypeError), ("--lr", ValueError)]:
        try:
            C.configure(dict(config), [bad])
        except err as e:
            assert bad.split("=")[0][2:] in str(e) or "expected" in str(e)
        else:
            raise AssertionError(f"{bad} accepted")
