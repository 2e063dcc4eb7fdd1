"""groups.py: what GRPO's groups look like from a checkpoint (sampled accuracy, against another
record's answer, mixed and rescue shares)."""
import os

import numpy as np
import pytest

import groups
from conftest import run_script

MC_B = dict(problem_type="multiple choice", solution="<answer>B</answer>")
MC_A = dict(problem_type="multiple choice", solution="<answer>A</answer>")


def response(answer):
    return f"<think>ok</think>\n<answer>{answer}</answer>"


def test_other_records_is_one_cycle_through_all():
    records = [dict(name=k) for k in range(7)]
    for seed in range(5):
        others = groups.other_records(records, np.random.default_rng(seed))
        assert sorted(o["name"] for o in others) == list(range(7))
        assert all(o is not r for o, r in zip(others, records))
        # one cycle: following the others from any record visits all 7 before coming back
        by_name = {r["name"]: o["name"] for r, o in zip(records, others)}
        seen = [0]
        while by_name[seen[-1]] != 0:
            seen.append(by_name[seen[-1]])
        assert len(seen) == 7


def test_prompt_stats_by_hand():
    # 1 of 4 right (B): mixed, and mostly wrong: RL could rescue it
    texts = [response("B"), response("A"), response("A"), response("C")]
    sampled, other, mixed, rescue = groups.prompt_stats(texts, MC_B, MC_A)
    assert (sampled, other, mixed, rescue) == (0.25, 0.5, 1.0, 1.0)
    # all right: not mixed, nothing to rescue; against A's answer all wrong
    texts = [response("B")] * 4
    assert groups.prompt_stats(texts, MC_B, MC_A) == (1.0, 0.0, 0.0, 0.0)
    # 3 of 4 right: mixed, but mostly right already; 2 of 4: not mostly wrong
    texts = [response("B"), response("B"), response("B"), response("D")]
    assert groups.prompt_stats(texts, MC_B, MC_A) == (0.75, 0.0, 1.0, 0.0)
    texts = [response("B"), response("B"), response("A"), response("D")]
    assert groups.prompt_stats(texts, MC_B, MC_A) == (0.5, 0.25, 1.0, 0.0)
    # a graded reward (OCR: 1 - word error rate) counts as right from 0.5: here 0.5, 0.25 and 0
    ocr = dict(problem_type="OCR", solution="<answer>red blue green yellow</answer>")
    other = dict(problem_type="OCR", solution="<answer>red red red red</answer>")
    texts = [response("red blue x y"), response("red x y z"), response("x y z w")]
    sampled, against_other, mixed, rescue = groups.prompt_stats(texts, ocr, other)
    assert np.isclose(sampled, 0.75 / 3) and np.isclose(against_other, 0.5 / 3)
    assert (mixed, rescue) == (1.0, 1.0)


@pytest.mark.slow
def test_script_prints_a_row_per_family_of_videos(toy):
    data_dir, model_path = toy
    code, out = run_script("groups.py", f"--model_path={model_path}",
                           f"--data={os.path.join(data_dir, 'eval.json')}", "--per_group=2",
                           "--num_generations=2", "--max_new_tokens=4")
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "prompts" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    # the toy's 30 eval records hold videos of every family
    assert sorted(names) == sorted(["change", "change_time", "colour", "count", "describe",
                                    "direction", "ocr", "order", "shape", "size"]), out
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[2:-1]]
        assert cells[0] in ("1", "2")
        sampled, other = float(cells[1]), float(cells[2])
        difference = float(cells[3].split("±")[0])
        assert abs(sampled - other - difference) < 0.11


@pytest.mark.slow
def test_a_record_without_the_field_is_named(toy):
    data_dir, model_path = toy
    code, out = run_script("groups.py", f"--model_path={model_path}",
                           f"--data={os.path.join(data_dir, 'eval.json')}", "--group_by=scene")
    assert code != 0
    assert "eval.json: record 0 (problem_id" in out and "has no field 'scene'" in out, out
