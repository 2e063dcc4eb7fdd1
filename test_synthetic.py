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


def shape_of_area(pixels, side=round(synthetic.OBJ_FRAC * 56)):
    """The shape whose area (square s^2, circle pi s^2 / 4, triangle s^2 / 2) is nearest to a pixel count."""
    area = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    return min(area, key=lambda shape: abs(pixels / (area[shape] * side ** 2) - 1))


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
    # the clips too, byte for byte: lossy x264 varied run to run (issue 13), lossless must not
    root, root_again = os.path.dirname(paths["eval"]), str(tmp_path / "again")
    for name in sorted(os.listdir(os.path.join(root, "videos"))):
        files = [os.path.join(r, "videos", name) for r in (root, root_again)]
        assert open(files[0], "rb").read() == open(files[1], "rb").read(), name


def test_record_format(task):
    paths, data = task
    ids = []
    for split, records in data.items():
        assert len(records) == SIZES[f"n_{split}"]
        root = os.path.dirname(paths[split])
        for r in records:
            assert r["family"] in synthetic.FAMILIES
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
    """The order clips show their four colours in the order the reasoning lists, a quarter of the frames each."""
    for path, r in records_of(task, "order"):
        listed = re.search(r"in the order (.*)\. So", r["process"]).group(1).split(", ")
        frames = frames_of(path)
        for t, frame in enumerate(frames):
            colour = listed[t * 4 // len(frames)]
            assert np.abs(object_colour(frame) - synthetic.COLOURS[colour]).max() < 20, (t, colour)
        nth = re.fullmatch(r"Which colour appears (\w+)\?", r["problem"]).group(1)
        assert sorted(listed) == sorted(synthetic.COLOURS) and answer_option(r) == listed[synthetic.NTH.index(nth)]


def test_colour_family_binds_the_asked_shape(task):
    """Two colours are present; the answer colour covers about the area of the asked shape (19 px side)."""
    for path, r in records_of(task, "colour"):
        frame = first_frame(path, r)
        near = [(np.abs(frame - c).max(-1) < 30).sum() for c in synthetic.COLOURS.values()]
        assert sum(n > 50 for n in near) == 2
        shape = re.fullmatch(r"What colour is the (\w+)\?", r["problem"]).group(1)
        assert shape_of_area(near[list(synthetic.COLOURS).index(answer_option(r))]) == shape


def test_ocr_clip_shows_the_words_in_order(task):
    for path, r in records_of(task, "ocr"):
        words = answer_of(r).split()
        for t, frame in enumerate(frames_of(path)):
            word = words[t // synthetic.FRAMES_PER_WORD]
            assert np.abs(object_colour(frame) - synthetic.COLOURS[word]).max() < 20, (t, word)


def test_size_and_count_clips(task):
    for path, r in records_of(task, "size"):
        area = [object_mask(f).sum() for f in frames_of(path)]
        area = area if answer_option(r) == "growing" else area[::-1]
        assert np.all(np.diff(area) >= 0) and area[-1] > 1.5 * area[0]  # the side grows by BIG_FRAC / OBJ_FRAC
    for path, r in records_of(task, "count"):  # one object per cell of a 4 x 4 grid, centred in it
        mask = object_mask(first_frame(path, r))
        assert sum(mask[7 + 14 * (q // 4), 7 + 14 * (q % 4)] for q in range(16)) == int(answer_of(r))


def test_direction_clip_moves_as_stated(task):
    axis_sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}  # (axis: 0 = y, 1 = x), sign
    for path, r in records_of(task, "direction"):
        axis, sign = axis_sign[answer_option(r)]
        centroids = np.array([np.argwhere(object_mask(f)).mean(0) for f in frames_of(path)])  # (frames, [y, x])
        along, across = sign * centroids[:, axis], centroids[:, 1 - axis]
        assert np.all(np.diff(along) > 0) and along[-1] - along[0] > 15
        assert np.ptp(across) < 2


def nearest_colour(frame):
    names = list(synthetic.COLOURS)
    return names[int(np.argmin([np.abs(object_colour(frame) - c).max() for c in synthetic.COLOURS.values()]))]


@pytest.mark.parametrize("family", ["change", "change_time"])
def test_change_frame_is_the_first_of_the_new_colour(task, family):
    for path, r in records_of(task, family):
        seen = [nearest_colour(f) for f in frames_of(path)]
        assert f"The frames show {', '.join(seen)}. So" in r["process"]
        k = next(t for t in range(1, len(seen)) if seen[t] != seen[0]) + 1
        assert seen[k - 1:] == [seen[-1]] * (len(seen) - k + 1)
        assert float(answer_of(r)) == (k if family == "change" else (k - 1) / 2)  # generated at 2 fps


@pytest.mark.slow
def test_cli(tmp_path):
    args = [sys.executable, "synthetic.py", str(tmp_path), "--n_sft", "2", "--n_rl", "2", "--n_eval", "3"]
    out = subprocess.run(args, cwd=os.path.dirname(os.path.abspath(synthetic.__file__)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [len(json.load(open(tmp_path / f"{s}.json"))) for s in synthetic.SPLITS] == [2, 2, 3]
