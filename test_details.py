"""DETAILS.md against the code: every number of "A worked example: rewards to advantages" is recomputed with
rewards.py (a number changed in either place fails), and the rows, clips and shapes of "One step's tensors,
pictured" are rebuilt with tgrpo.rollout on a small synthetic set."""
import os
from decimal import Decimal
import numpy as np
import torch
import data
import lifecycle
import model as M
import rewards
import tgrpo

HERE = os.path.dirname(os.path.abspath(__file__))
ALPHA, MU, THRESHOLD = 0.3, 1.0, 0.5


def section(title):
    """The text of DETAILS.md's section `title`, up to the next section."""
    with open(os.path.join(HERE, "DETAILS.md")) as f:
        text = f.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def table_rows(text):
    """{first cell: the other cells} of every markdown table row of `text`, rule rows left out."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert cells[0] not in rows, f"two table rows labelled {cells[0]!r}"
            rows[cells[0]] = cells[1:]
    return rows


def worked_example():
    """{row label: values} of the worked example, each computed by rewards.py (None: an empty cell)."""
    contrast, accuracy, fmt = [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]
    bonus, p, p_tilde, granted = rewards.temporal_bonus(accuracy, contrast, "paper", ALPHA, MU, THRESHOLD)
    base = np.add(accuracy, fmt)
    plain, _ = rewards.advantages(base, np.zeros(4))
    eq3, eq3_change = rewards.advantages(base, bonus)
    on_advantage, on_advantage_change = rewards.advantages(base, bonus, bonus_to="advantage")
    unscaled_plain, _ = rewards.advantages(base, np.zeros(4), scale=False)
    unscaled, unscaled_change = rewards.advantages(base, bonus, scale=False)
    row = lambda values, change=None: [*values, change]
    return {
        "group": ["value"],
        "p: share of correct ordered responses": [p],
        "p~: share of correct contrast responses": [p_tilde],
        "bonus granted: p >= mu * p~": [granted],
        "response": ["1", "2", "3", "4", "mean abs change of A"],
        "contrast accuracy (shuffled frames)": row(contrast),
        "accuracy a_i": row(accuracy),
        "format f_i": row(fmt),
        "r_i = a_i + f_i": row(base),
        "temporal bonus (eq. 1: alpha if correct)": row(bonus),
        "R_i = r_i + bonus (eq. 2)": row(base + np.asarray(bonus)),
        "A_i of r_i: no bonus (plain GRPO)": row(plain),
        "A_i of R_i (eq. 3, the default)": row(eq3, eq3_change),
        'A_i of r_i, then + bonus (`bonus_to="advantage"`)': row(on_advantage, on_advantage_change),
        "r_i - mean r: no bonus, `scale_rewards=False`": row(unscaled_plain),
        "R_i - mean R (`scale_rewards=False`)": row(unscaled, unscaled_change),
    }


def printed_as(cell, value):
    """Whether `cell` prints `value`: exactly, or rounded to the cell's last digit, which must then be at least the
    4th decimal (so 0.87 for 0.8659 fails). Text cells (headers, yes/no) must match as text."""
    if isinstance(value, str) or value is None:
        return cell == (value or "")
    if isinstance(value, (bool, np.bool_)):
        return cell == ("yes" if value else "no")
    printed = Decimal(cell)
    if abs(float(printed) - float(value)) < 1e-12:
        return True
    return printed.as_tuple().exponent <= -4 and Decimal(float(value)).quantize(printed) == printed


def test_worked_example_numbers_are_what_rewards_py_computes():
    printed = table_rows(section("A worked example: rewards to advantages"))
    expected = worked_example()
    assert printed.keys() == expected.keys(), "each row of the worked example must be one that this test computes"
    for label, values in expected.items():
        assert len(printed[label]) == len(values), f"{label!r}: {printed[label]} against {values}"
        for cell, value in zip(printed[label], values):
            assert printed_as(cell, value), f"{label!r}: DETAILS.md prints {cell!r}, rewards.py gives {value!r}"


def test_printed_as_needs_the_value_to_the_printed_precision():
    assert printed_as("0.8659", 0.865875) and printed_as("2.3", 2.3000000000000003) and printed_as("3.5e-05", 3.46e-5)
    assert not printed_as("0.8658", 0.865875) and not printed_as("0.87", 0.865875) and not printed_as("0.0", 3e-5)
    assert printed_as("yes", True) and not printed_as("no", True) and printed_as("", None)


def test_one_step_picture_rows_clips_and_shapes(toy, monkeypatch):
    """The picture's numbers that do not depend on the tokenizer (P does): one video and one image prompt."""
    for name, value in (("num_generations", 8), ("num_contrast", 4), ("max_new_tokens", 64), ("seed", 0)):
        monkeypatch.setattr(tgrpo, name, value)
    data_dir, model_path = toy
    records, _ = data.load_records(os.path.join(data_dir, "rl.json"))
    video, image = (next(r for r in records if r["data_type"] == kind) for kind in ("video", "image"))
    policy, tok = lifecycle.load_model(model_path, "cpu")
    examples, rows, batch, ids, mask, _ = tgrpo.rollout(policy.eval(), [video, image], tok, 0, "cpu")
    assert rows == [(0, False)] * 8 + [(0, True)] * 4 + [(1, False)] * 8
    assert batch.row_clip == [0] * 8 + [1] * 4 + [2] * 8
    assert [(c.is_video, c.grid_thw, c.pixel_values.shape[0], c.num_tokens) for c in batch.clips] == [
        (True, (4, 4, 4), 64, 16), (True, (4, 4, 4), 64, 16), (False, (1, 4, 4), 16, 4)]
    B, P = batch.input_ids.shape
    n_video, n_image = (len(example.prompt[0]) for example in examples)
    assert B == 20 and P == n_video > n_image
    assert batch.attention_mask.shape == batch.mm_types.shape == (B, P) and batch.position_ids.shape == (3, B, P)
    assert batch.next_pos.tolist() == [P - 9] * 12 + [n_image - 2] * 8  # 16 video tokens take 7 positions, 4 take 2
    video_pos = batch.position_ids[:, 0][:, batch.mm_types[0] == data.MM_TYPE[data.VIDEO_PAD]]
    start = video_pos.min().item()
    assert sorted(set(video_pos[0].tolist())) == [start, start + 2, start + 4, start + 6]
    assert sorted(set(video_pos[1].tolist())) == sorted(set(video_pos[2].tolist())) == [start, start + 1]
    T = ids.shape[1]
    assert ids.shape == mask.shape == (B, T) and T <= 64
    keep = tgrpo.ordered_rows(rows)
    assert keep == list(range(8)) + list(range(12, 20))
    sub = batch.select(keep)
    assert sub.row_clip == [0] * 8 + [2] * 8
    with torch.no_grad():
        assert M.completion_logprobs(policy, sub, ids[keep], mask[keep]).shape == (16, T)
