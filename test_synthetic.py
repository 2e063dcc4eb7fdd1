"""Tests of the synthetic task: format, determinism, and that the pixels say what the answers say."""
import json
import os
import re
import subprocess
import sys

import decord
import numpy as np
import pytest
from PIL import Image

import synthetic

SIZES = dict(n_sft=20, n_rl=10, n_eval=80)  # eval: 8 records per family, enough for every MC letter
OBJECT_THRESHOLD = 60  # a pixel belongs to an object when a channel differs this much from the background


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    paths = synthetic.generate(str(tmp_path_factory.mktemp("synthetic")), seed=0, **SIZES)
    return paths, {split: json.load(open(p)) for split, p in paths.items()}


def frames_of(path):
    vr = decord.VideoReader(path)
    return vr.get_batch(list(range(len(vr)))).asnumpy().astype(int)


def first_frame(path, rec):
    return frames_of(path)[0] if rec["data_type"] == "video" else np.asarray(Image.open(path)).astype(int)


def object_mask(frame):
    return np.abs(frame - np.array(synthetic.BACKGROUND)).max(-1) > OBJECT_THRESHOLD


def object_colour(frame):
    """Mean RGB of the objects' interior (2 px from the edge, as H.264's half-resolution chroma blurs the edge)."""
    mask = object_mask(frame)
    inner = mask[2:-2, 2:-2] & mask[:-4, 2:-2] & mask[4:, 2:-2] & mask[2:-2, :-4] & mask[2:-2, 4:]
    return frame[2:-2, 2:-2][inner].mean(0)


def records_of(task, family):
    paths, data = task
    return [(os.path.join(os.path.dirname(paths["eval"]), r["path"]), r) for r in data["eval"] if r["family"] == family]


def answer_of(rec):
    return re.fullmatch(r"<answer>(.*)</answer>", rec["solution"]).group(1)


def answer_option(rec):
    """The option text the solution letter points to."""
    return rec["options"]["ABCD".index(answer_of(rec))].split(". ", 1)[1]


def test_same_seed_same_json_other_seed_differs(task, tmp_path):
    paths, _ = task
    again = synthetic.generate(str(tmp_path / "again"), seed=0, **SIZES)
    other = synthetic.generate(str(tmp_path / "other"), seed=1, **SIZES)
    for split in synthetic.SPLITS:
        assert open(again[split]).read() == open(paths[split]).read()
        assert open(other[split]).read() != open(paths[split]).read()


def test_record_format(task):
    paths, data = task
    ids = []
    for split, records in data.items():
        assert len(records) == SIZES[f"n_{split}"]
        root = os.path.dirname(paths[split])
        for r in records:
            assert r["family"] in synthetic.FAMILIES and r["data_source"] == f"synthetic/{r['family']}"
            assert r["temporal"] is synthetic.FAMILIES[r["family"]][1]
            assert r["problem_type"] in ("multiple choice", "numerical", "OCR", "free-form", "regression")
            assert r["data_type"] in ("video", "image") and (r["data_type"] == "video" or not r["temporal"])
            assert re.fullmatch(r"<think>[^<>]+</think>", r["process"])
            assert re.fullmatch(r"<answer>[^<>]+</answer>", r["solution"])
            assert "Options" not in r["problem"] and "A." not in r["problem"]
            ext = ".mp4" if r["data_type"] == "video" else ".png"
            assert r["path"].startswith("./") and r["path"].endswith(ext)
            assert os.path.isfile(os.path.join(root, r["path"]))
            ids.append(r["problem_id"])
    assert sorted(ids) == list(range(sum(SIZES.values())))


def test_answers_match_options_and_types(task):
    _, data = task
    for r in data["sft"] + data["rl"] + data["eval"]:
        answer = answer_of(r)
        if r["problem_type"] == "multiple choice":
            letters = "ABCD"[:len(r["options"])]
            assert [o[:3] for o in r["options"]] == [f"{c}. " for c in letters] and answer in letters
            assert len(set(r["options"])) == len(r["options"])
            assert answer_option(r) in r["process"]  # the reasoning names the right option
        else:
            assert "options" not in r
        if r["problem_type"] == "numerical":
            assert answer.isdigit()
        if r["problem_type"] == "regression":
            assert re.fullmatch(r"\d+\.\d+", answer) and float(answer) > 0  # regression reward divides by it


def test_coverage_and_balance(task):
    _, data = task
    ev = data["eval"]
    assert {r["family"] for r in ev} == set(synthetic.FAMILIES)
    assert len({r["problem_type"] for r in ev}) == 5
    assert {r["temporal"] for r in ev} == {True, False}
    assert {r["data_type"] for r in ev} == {"video", "image"}
    per_family = [sum(r["family"] == f for r in ev) for f in synthetic.FAMILIES]
    assert max(per_family) - min(per_family) <= 1
    for family, (_, _, ptype, _, choices, _, _) in synthetic.FAMILIES.items():
        if ptype == "multiple choice":  # every letter is the answer somewhere
            letters = {r["solution"] for r in ev if r["family"] == family}
            assert letters == {f"<answer>{c}</answer>" for c in "ABCD"[:len(choices)]}


@pytest.mark.parametrize("frames,size", [(8, 56), (16, 84)])
def test_video_reads_back(tmp_path, frames, size):
    paths = synthetic.generate(str(tmp_path), seed=3, n_sft=10, n_rl=0, n_eval=0, frames=frames, size=size, fps=2)
    rec = next(r for r in json.load(open(paths["sft"])) if r["data_type"] == "video")
    vr = decord.VideoReader(os.path.join(str(tmp_path), rec["path"]))
    assert len(vr) == frames and vr[0].shape == (size, size, 3) and vr.get_avg_fps() == pytest.approx(2.0)


def test_colour_survives_compression(task):
    for path, r in records_of(task, "colour"):
        frame = first_frame(path, r)
        mean, colour = object_colour(frame), answer_option(r)
        assert np.abs(mean - synthetic.COLOURS[colour]).max() < 20, (colour, mean)


def test_order_clip_shows_the_answer_first(task):
    for path, r in records_of(task, "order"):
        frames = frames_of(path)
        first, last = object_colour(frames[0]), object_colour(frames[-1])
        assert np.abs(first - synthetic.COLOURS[answer_option(r)]).max() < 20
        assert np.abs(last - first).max() > 60  # a different colour closes the clip


def test_ocr_clip_shows_the_words_in_order(task):
    for path, r in records_of(task, "ocr"):
        words = answer_of(r).split()
        for t, frame in enumerate(frames_of(path)):
            word = words[t // synthetic.FRAMES_PER_WORD]
            assert np.abs(object_colour(frame) - synthetic.COLOURS[word]).max() < 20, (t, word)


def test_size_and_count_clips(task):
    for path, r in records_of(task, "size"):
        area = [object_mask(f).sum() for f in frames_of(path)]
        assert np.all(np.diff(area) > 0) if answer_option(r) == "growing" else np.all(np.diff(area) < 0)
    for path, r in records_of(task, "count"):  # the objects have distinct colours: count the colours present
        frame = first_frame(path, r)
        pixels = frame[object_mask(frame)]
        near = np.argmin([np.abs(pixels - c).sum(-1) for c in synthetic.COLOURS.values()], axis=0)
        assert (np.bincount(near, minlength=4) > 100).sum() == int(answer_of(r))


def test_direction_clip_moves_as_stated(task):
    axis_sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}  # (axis: 0 = y, 1 = x), sign
    for path, r in records_of(task, "direction"):
        axis, sign = axis_sign[answer_option(r)]
        centroids = np.array([np.argwhere(object_mask(f)).mean(0) for f in frames_of(path)])  # (frames, [y, x])
        along, across = sign * centroids[:, axis], centroids[:, 1 - axis]
        assert np.all(np.diff(along) > 0) and along[-1] - along[0] > 15
        assert np.ptp(across) < 2


def test_crossing_frame_is_first_frame_past_middle(task):
    for path, r in records_of(task, "cross"):
        k = int(answer_of(r))
        frames = frames_of(path)
        xs = np.array([np.argwhere(object_mask(f))[:, 1].mean() + 0.5 for f in frames])  # centroid, pixel centres
        side = np.sign(xs - frames.shape[2] / 2)  # -1 left of the middle, +1 right
        assert np.all(side[:k - 1] == side[0]) and np.all(side[k - 1:] == -side[0])
        assert f"at the {'left' if side[0] < 0 else 'right'} up to frame {k - 1}" in r["process"]


def test_cli(tmp_path):
    args = [sys.executable, "synthetic.py", str(tmp_path), "--n_sft", "2", "--n_rl", "2", "--n_eval", "3"]
    out = subprocess.run(args, cwd=os.path.dirname(os.path.abspath(synthetic.__file__)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [len(json.load(open(tmp_path / f"{s}.json"))) for s in synthetic.SPLITS] == [2, 2, 3]
