"""Tests of data.py: record validation, frame sampling, resizing, Qwen's patch layout, prompts."""
import json
import zlib
from pathlib import Path
import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
import data
import rewards
from data import DataError

SHARED_VIDEO = Path(__file__).parent.parent / "shared" / "video1.mp4"
STEP = 12  # brightness step between generated frames, so a decoded frame tells which one it was


def write_mp4(path, n, fps, h=56, w=84, index_first=False):
    """An H.264 clip whose frame i is uniformly grey at i*STEP % 256; index_first puts the moov atom before the
    frames."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if index_first else {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * STEP % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def good_records():
    return [
        {"problem_id": 1, "problem": "Where does the square go?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. left", "B. right"], "solution": "<answer>B</answer>",
         "path": "./clips/a.mp4", "data_source": "synthetic", "temporal": True},
        {"problem_id": 2, "problem": "How many dots?", "data_type": "image", "problem_type": "numerical",
         "solution": "<answer>3</answer>", "path": "imgs/b.png", "process": "<think>I count 3.</think>"},
    ]


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path

# ----------------------------------------------------------------------------- records


def test_load_records_resolves_paths_and_keeps_fields(tmp_path):
    path = write_json(tmp_path / "sub" / "rl.json", good_records())
    records, skipped = data.load_records(path)
    assert skipped == 0 and [r["index"] for r in records] == [0, 1]
    assert records[0]["path"] == str(tmp_path / "sub" / "clips" / "a.mp4")
    assert records[1]["path"] == str(tmp_path / "sub" / "imgs" / "b.png")
    assert records[0]["temporal"] is True and records[0]["data_source"] == "synthetic"
    records, _ = data.load_records(str(path), root=tmp_path / "media")
    assert records[0]["path"] == str(tmp_path / "media" / "clips" / "a.mp4")


def _without(field):
    return lambda r: r.pop(field)


BAD_CASES = [  # (change to the multiple choice record, the field the message must name)
    (lambda r: r.update(data_type="audio"), "data_type"),
    (lambda r: r.update(problem_type="essay"), "problem_type"),
    (_without("problem"), "problem"),
    (_without("solution"), "solution"),
    (_without("path"), "path"),
    (_without("options"), "options"),
    (lambda r: r.update(options=[]), "options"),
    (lambda r: r.update(options=["A. x", 2]), "options"),
    (lambda r: r.update(solution=3), "solution"),
    (lambda r: r.update(problem=""), "problem"),
    (lambda r: r.update(process=["<think>"]), "process"),
    # ground truth every rollout would be scored against: a regression/numerical answer must be a finite number, a
    # multiple choice one an option letter (else every rollout scores 0, or eval crashes without naming the record)
    (lambda r: r.update(problem_type="regression", solution="<answer>nan</answer>"), "solution"),
    (lambda r: r.update(problem_type="regression", solution="<answer>1e999</answer>"), "solution"),
    (lambda r: r.update(problem_type="numerical", solution="<answer>inf</answer>"), "solution"),
    (lambda r: r.update(problem_type="numerical", solution="<answer>three</answer>"), "solution"),
    (lambda r: r.update(problem_type="numerical", solution="3"), "solution"),  # no <answer> tag: the answer is ""
    (lambda r: r.update(solution="<answer>E</answer>"), "solution"),
    (lambda r: r.update(solution="<answer>B. right</answer>"), "solution"),
    # options in another letter form: an answer outside them is still refused
    (lambda r: r.update(options=["A) left", "B) right"], solution="<answer>C</answer>"), "solution"),
    (lambda r: r.update(options=["left", "right"]), "solution"),  # no letters at all
]


@pytest.mark.parametrize("change,field", BAD_CASES)
def test_bad_record_names_file_record_and_field(tmp_path, change, field):
    records = good_records()[::-1]  # the bad one at index 1
    change(records[1])
    path = write_json(tmp_path / "rl.json", records)
    with pytest.raises(DataError) as err:
        data.load_records(path)
    assert "rl.json" in str(err.value) and "record 1" in str(err.value) and f"'{field}'" in str(err.value)
    assert "rl.json record 1 (problem_id 1): " in str(err.value)  # how users find it in a 260k-record file


def test_skip_bad_counts_and_warns(tmp_path, capsys):
    good, bad = good_records(), good_records()
    for change, _ in BAD_CASES[:3]:
        change(bad[0])
    path = write_json(tmp_path / "rl.json", [bad[0], good[0], 7, good[1]])
    records, skipped = data.load_records(path, skip_bad=True)
    assert skipped == 2 and [r["index"] for r in records] == [1, 3]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and "record 0" in warnings[0] and "record 2" in warnings[1]
    assert "record 0 (problem_id 1): " in warnings[0] and "record 2: " in warnings[1]  # 7 has no problem_id


def test_problem_id_is_named_as_written(tmp_path):
    records = [dict(good_records()[0], problem_id="tvqa-1601", data_type="audio"), good_records()[1]]
    with pytest.raises(DataError, match=r"rl.json record 0 \(problem_id 'tvqa-1601'\): 'data_type'"):
        data.load_records(write_json(tmp_path / "rl.json", records))


@pytest.mark.parametrize("option,letter", [
    ("A. left", "A"),                                       # Video-R1's usual form
    ("D) It is used to focus the laser for the LDV", "D"),  # Video-R1-260k's ArxivQA records
    ("B: right", "B"),
    ("(C) up", "C"),
    ("E down", "E"),
    ("F", "F"),
    ("  G. leading spaces", "G"),
    ("a. lower case", "a"),
    ("Apple", None),                                        # a word, not a letter
    ("AB. two letters", None),
    ("1. a number", None),
    ("(AB) two letters", None),
    ("", None),
])
def test_option_letter_forms(option, letter):
    assert data.option_letter(option) == letter


def test_arxivqa_options_load_and_reach_the_prompt_as_written(tmp_path):
    """Shaped like problem_id 1 of Video-R1-260k (and of COT-165k): options "A) ...", answer "D"."""
    options = ["A) It is used to focus the laser for the LDV", "B) It is used to split the beam",
               "C) It is used to collimate the light", "D) It is used to image the vibrating surface"]
    record = {"problem_id": 1, "problem": "What is the purpose of the lens in the setup?", "data_type": "image",
              "problem_type": "multiple choice", "options": options, "process": "<think>...</think>",
              "solution": "<answer>D</answer>", "path": "./Multimodal-R1/ArxivQA/images/1.jpg",
              "data_source": "ArxivQA"}
    records, skipped = data.load_records(write_json(tmp_path / "cot.json", [record]), required=("process",))
    assert skipped == 0
    text = data.question_text(records[0])
    assert text.startswith(record["problem"] + "Options:\n" + "".join(o + "\n" for o in options) + "\n")
    # scoring compares answer letters, as for "A. ..." options: the option text plays no part
    assert rewards.accuracy_reward("<think>.</think><answer>D</answer>", record["solution"], "multiple choice") == 1
    assert rewards.accuracy_reward("<answer>D)</answer>", record["solution"], "multiple choice") == 0
    assert rewards.accuracy_reward("<answer>C</answer>", record["solution"], "multiple choice") == 0
    for solution in ("<answer>E</answer>", "<answer>D)</answer>"):  # not one of the letters: refused, named
        bad = dict(record, solution=solution)
        with pytest.raises(DataError, match=r"cot.json record 0 \(problem_id 1\): 'solution' answer"):
            data.load_records(write_json(tmp_path / "cot.json", [bad]))


def test_good_ground_truth_passes(tmp_path):
    regression = dict(good_records()[1], problem_type="regression", solution="<answer>-1,200.5</answer>")
    records = good_records() + [regression]
    assert len(data.load_records(write_json(tmp_path / "rl.json", records))[0]) == 3


def test_no_records_left_names_the_file_and_why(tmp_path):
    with pytest.raises(DataError, match="empty.json: no records to use: the list is empty"):
        data.load_records(write_json(tmp_path / "empty.json", []), skip_bad=True)
    bad = [dict(r, data_type="audio") for r in good_records()]
    with pytest.raises(DataError, match="bad.json: no records to use: all 2 were bad and skipped"):
        data.load_records(write_json(tmp_path / "bad.json", bad), skip_bad=True)


@pytest.mark.parametrize("content", ['{"problem": "x"}', "[{", ""])
def test_file_that_is_not_a_json_list_errors(tmp_path, content):
    path = tmp_path / "rl.json"
    path.write_text(content)
    with pytest.raises(DataError, match="rl.json"):
        data.load_records(path, skip_bad=True)
    with pytest.raises(DataError, match="missing.json"):
        data.load_records(tmp_path / "missing.json", skip_bad=True)

# ----------------------------------------------------------------------------- media


@pytest.mark.parametrize("size", [(360, 640), (56, 84), (10, 10), (1080, 1920), (27, 29), (300, 14), (14, 2000),
                                  (1, 150), (241, 3000), (720, 1280)])
@pytest.mark.parametrize("limits", [(4 * 28 * 28, 128 * 28 * 28), (4 * 28 * 28, 256 * 28 * 28),
                                    (128 * 28 * 28, 128 * 28 * 28), (56 * 56, 28 * 28 * 1280)])
def test_smart_resize_matches_transformers(size, limits):
    expected = hf_smart_resize(*size, factor=28, min_pixels=limits[0], max_pixels=limits[1])
    assert data.smart_resize(*size, min_pixels=limits[0], max_pixels=limits[1]) == expected


def test_smart_resize_defaults_and_aspect_limit():
    assert data.smart_resize(333, 777) == hf_smart_resize(333, 777)
    with pytest.raises(DataError, match="aspect"):
        data.smart_resize(10, 2010)


@pytest.mark.slow
@pytest.mark.parametrize("max_frames,max_pixels", [(16, 128 * 28 * 28), (64, 256 * 28 * 28)])
def test_read_shared_video(max_frames, max_pixels):
    if not SHARED_VIDEO.exists():
        pytest.skip(f"{SHARED_VIDEO} is not present")
    import decord
    reader = decord.VideoReader(str(SHARED_VIDEO))
    total, duration = len(reader), len(reader) / reader.get_avg_fps()
    frames, fps, _ = data.read_video(str(SHARED_VIDEO), fps=2.0, max_frames=max_frames, max_pixels=max_pixels)
    n, H, W, C = frames.shape
    assert n == min(max(duration * 2.0, 4), max_frames, total) // 2 * 2 and 4 <= n <= max_frames
    assert fps == pytest.approx(n / duration)
    assert frames.dtype == np.uint8 and C == 3 and H % 28 == 0 and W % 28 == 0 and H * W <= max_pixels
    assert (H, W) == data.smart_resize(*reader[0].shape[:2], max_pixels=max_pixels)
    # qwen-vl-utils' frames: torch.linspace indices, torchvision's antialiased bicubic resize of the decoded frames
    raw = torch.from_numpy(reader.get_batch(torch.linspace(0, total - 1, n).round().long().tolist()).asnumpy())
    resized = torch.nn.functional.interpolate(raw.permute(0, 3, 1, 2).float(), size=(H, W), mode="bicubic",
                                              antialias=True).clamp(0, 255).round().to(torch.uint8)
    assert np.array_equal(frames, resized.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("total,file_fps,min_frames,max_frames,expected", [
    (20, 10, 4, 16, 4),    # 2 s at 2 fps
    (20, 5, 4, 16, 8),     # 4 s
    (7, 2, 4, 16, 6),      # 3.5 s -> 7 -> even 6
    (3, 2, 4, 16, 2),      # shorter than min_frames: all frames, rounded down to even
    (5, 2, 8, 16, 4),
    (20, 2, 4, 16, 16),    # 10 s -> 20, clamped to max_frames
    (9, 2, 4, 6, 6),
])
def test_read_generated_video(tmp_path, total, file_fps, min_frames, max_frames, expected):
    path = write_mp4(tmp_path / "clip.mp4", total, file_fps)
    frames, fps, _ = data.read_video(str(path), fps=2.0, min_frames=min_frames, max_frames=max_frames)
    assert frames.shape == (expected, 56, 84, 3)
    assert fps == pytest.approx(expected / (total / file_fps))
    sampled = np.linspace(0, total - 1, expected).round()  # uniform sampling, in order, ends included
    assert np.abs(frames.mean(axis=(1, 2, 3)) / STEP - sampled).max() < 0.5


def test_frame_count_floors_as_qwen_vl_utils(tmp_path):
    """A 2.9 s clip at 10 fps, sampled at 2 fps: 5.8 frames floor to 4 (rounding first would take 6), at indices
    torch.linspace(0, 28, 4).round() = 0, 9, 19, 28 and 4 / 29 * 10 fps."""
    path = write_mp4(tmp_path / "clip.mp4", 29, 10)
    frames, fps, _ = data.read_video(str(path), fps=2.0, min_frames=4, max_frames=16)
    assert frames.shape[0] == 4 and fps == pytest.approx(4 / 29 * 10)
    grey = np.array([0, 9, 19, 28]) * STEP % 256
    assert np.abs(frames.mean(axis=(1, 2, 3)) - grey).max() < STEP / 2


def test_video_frames_resize_as_torchvision_and_images_as_pil():
    """Video frames: antialiased bicubic on floats, clamped and rounded to uint8 (torchvision's tensor resize, which
    qwen-vl-utils uses); images: PIL bicubic. The two filters differ, so the test can tell which one ran."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 100, 130, 3), dtype=np.uint8)
    h, w = data.smart_resize(100, 130, max_pixels=8 * 28 * 28)
    video = data._resize(frames, "x.mp4", 4 * 28 * 28, 8 * 28 * 28, video=True)
    torch_bicubic = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(h, w),
                                                    mode="bicubic", antialias=True).clamp(0, 255).round().byte()
    assert np.array_equal(video, torch_bicubic.permute(0, 2, 3, 1).numpy())
    image = data._resize(frames[:1], "x.png", 4 * 28 * 28, 8 * 28 * 28, video=False)
    assert np.array_equal(image[0], np.asarray(Image.fromarray(frames[0]).resize((w, h), Image.BICUBIC)))
    assert not np.array_equal(image[0], video[0])


def test_read_video_resizes_all_frames_to_one_size(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", 8, 4, h=100, w=130)
    frames, *_ = data.read_video(str(path), min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)
    assert frames.shape == (4, *data.smart_resize(100, 130, max_pixels=8 * 28 * 28), 3)


def _bad_media(tmp_path, kind):
    """The path of one kind of broken media file, and the reader for it."""
    if kind == "missing video":
        return tmp_path / "nothere.mp4", data.read_video
    if kind == "text as mp4":
        (tmp_path / "notes.mp4").write_text("these are not video frames\n" * 20)
        return tmp_path / "notes.mp4", data.read_video
    if kind.startswith("truncated"):  # without the index (moov at the end), or with it but half the frames
        whole = write_mp4(tmp_path / "whole.mp4", 20, 5, index_first=kind.endswith("index first")).read_bytes()
        (tmp_path / "half.mp4").write_bytes(whole[:len(whole) // 2])
        return tmp_path / "half.mp4", data.read_video
    if kind == "1-frame video":
        return write_mp4(tmp_path / "single.mp4", 1, 5), data.read_video
    if kind == "timescale 0":  # mdhd timescale 0: decord reports ~2e-4 fps and returns frame 0 for every index
        mp4 = bytearray(write_mp4(tmp_path / "clip.mp4", 16, 4).read_bytes())
        at = mp4.find(b"mdhd") + 4 + 4 + (16 if mp4[mp4.find(b"mdhd") + 4] == 1 else 8)  # version+flags, times
        mp4[at:at + 4] = (0).to_bytes(4, "big")
        (tmp_path / "timescale0.mp4").write_bytes(bytes(mp4))
        return tmp_path / "timescale0.mp4", data.read_video
    if kind.endswith("pixel image"):  # a 65-byte PNG whose header claims 20000x20000 (or 10000x10000) pixels
        side = 20000 if kind.startswith("400M") else 10000
        chunk = lambda kind, body: (len(body).to_bytes(4, "big") + kind + body +
                                    zlib.crc32(kind + body).to_bytes(4, "big"))
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])) +
               chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
        (tmp_path / "bomb.png").write_bytes(png)
        return tmp_path / "bomb.png", data.read_image
    if kind == "corrupt image":
        (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
        return tmp_path / "noise.png", data.read_image
    return tmp_path / "nothere.png", data.read_image


@pytest.mark.parametrize("kind", ["missing video", "text as mp4", "truncated", "truncated, index first",
                                  "1-frame video", "timescale 0", "corrupt image", "missing image",
                                  "400M-pixel image", "100M-pixel image"])
def test_bad_media_names_the_file(tmp_path, kind):
    path, reader = _bad_media(tmp_path, kind)
    with pytest.raises(DataError) as err:
        reader(str(path))
    assert path.name in str(err.value)
    expected = {"1-frame video": "1-frame video: a video needs at least 2 frames", "timescale 0": "broken timing",
                "400M-pixel image": "decompression bomb", "100M-pixel image": "decompression bomb"}
    assert expected.get(kind, "") in str(err.value)
    if kind == "400M-pixel image":
        assert path.stat().st_size < 100  # a few bytes claim 1.2 GB of pixels


def test_load_example_errors_name_the_json_record_and_media(tmp_path, tokenizer):
    records = good_records()
    records[1]["path"] = "imgs/missing.png"
    record = data.load_records(write_json(tmp_path / "rl.json", records))[0][1]
    config = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=3136, max_pixels=128 * 28 * 28,
                  total_pixels=0, max_prompt_tokens=1000, prompt_style="reasoning")
    with pytest.raises(DataError,
                       match=r"rl.json record 1 \(problem_id 2\): .*imgs/missing.png: image file not found"):
        data.load_example(record, tokenizer, config)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((56, 84, 3), np.uint8)).save(tmp_path / "imgs" / "missing.png")
    prompt, clip, *_ = data.load_example(record, tokenizer, config)
    assert len(prompt[0]) < 1000
    record["problem"] = "How many dots? " * 400  # over max_prompt_tokens: a bad record, named
    with pytest.raises(DataError,
                       match=r"rl.json record 1 \(problem_id 2\): prompt of \d+ tokens exceeds max_prompt_tokens=1000"):
        data.load_example(record, tokenizer, config)
    examples, skipped = data.load_examples([record], tokenizer, config | {"skip_bad": True})
    assert examples == [] and skipped == 1


def test_read_media_dispatches(tmp_path):
    video = write_mp4(tmp_path / "v.mp4", 8, 4)
    Image.fromarray(np.zeros((56, 84, 3), np.uint8)).save(tmp_path / "i.png")
    limits = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=3136, max_pixels=128 * 28 * 28)
    frames, fps, _ = data.read_media({"data_type": "video", "path": str(video)}, **limits)
    assert frames.shape[0] == 4 and fps == pytest.approx(2.0)
    frames, fps, _ = data.read_media({"data_type": "image", "path": str(tmp_path / "i.png")}, **limits)
    assert frames.shape == (2, 56, 84, 3) and fps is None

def write_frames(folder, n, h=56, w=84, size_of=None):
    """A folder of n JPEG frames 00001.jpg ... as MVBench ships TVQA, frame i uniformly grey at i*STEP % 256; written
    last to first, so only sorting by name puts them in order. size_of(i): another (h, w) for frame i."""
    folder.mkdir(parents=True)
    for i in reversed(range(n)):
        shape = (h, w) if size_of is None else size_of(i)
        Image.fromarray(np.full((*shape, 3), i * STEP % 256, np.uint8)).save(folder / f"{i + 1:05d}.jpg", quality=95)
    (folder / "notes.txt").write_text("not a frame")
    return folder


TVQA_PATH = "./Evaluation/MVBench/tvqa/frames_fps3_hq/castle_s07e04_seg02_clip_14.mp4"


def frame_record(**fields):
    """Shaped like eval_mvbench.json's TVQA records (problem_id 1600-1799)."""
    return {"problem_id": 1601, "problem": "What does Castle hold?", "data_type": "frame",
            "problem_type": "multiple choice", "options": ["A. a gun", "B. a phone"], "solution": "<answer>B</answer>",
            "path": TVQA_PATH, "fps": 3, **fields}


FRAME_CONFIG = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=3136, max_pixels=128 * 28 * 28,
                    total_pixels=0, max_prompt_tokens=1000, contrast_timestamps="ordered",
                    prompt_style="reasoning")


@pytest.mark.parametrize("layout", ["mp4 file", "folder of that name", "folder without .mp4 (MVBench's own)"])
def test_frame_records_read_as_the_video_they_are(tmp_path, tokenizer, layout):
    """20 frames at 3 fps are 6.7 s: at 2 fps 13.3 frames, floored to 12, at 12 / 20 * 3 = 1.8 fps, whether the path
    is the video file or a folder of its frames."""
    clip_path = tmp_path / TVQA_PATH
    if layout == "mp4 file":
        clip_path.parent.mkdir(parents=True)
        write_mp4(clip_path, 20, 3)
    elif layout == "folder of that name":
        write_frames(clip_path, 20)
    else:
        write_frames(clip_path.with_suffix(""), 20)
    records, _ = data.load_records(write_json(tmp_path / "eval_mvbench.json", [frame_record()]))
    frames, fps, _ = data.read_media(records[0], **{k: FRAME_CONFIG[k] for k in data.FRAME_LIMITS})
    assert frames.shape == (12, 56, 84, 3) and fps == pytest.approx(1.8)
    sampled = np.linspace(0, 19, 12).round()  # read_video's rule: uniform, in order, ends included
    assert np.abs(frames.mean(axis=(1, 2, 3)) / STEP - sampled).max() < 0.5
    prompt, clip, contrast, _ = data.load_example(records[0], tokenizer, FRAME_CONFIG, np.random.default_rng(0))
    assert clip.is_video and clip.second_per_grid == pytest.approx(2 / 1.8) and contrast.grid_thw == clip.grid_thw


def test_frame_folder_resizes_and_limits_as_a_video(tmp_path):
    folder = write_frames(tmp_path / "clip", 40, h=100, w=130)
    frames, fps, _ = data.read_frame_folder(str(folder), 3, fps=2.0, min_frames=4, max_frames=8,
                                         min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)
    assert frames.shape == (8, *data.smart_resize(100, 130, max_pixels=8 * 28 * 28), 3) and fps == pytest.approx(0.6)
    grey = np.linspace(0, 39, 8).round() * STEP % 256
    raw = np.stack([np.asarray(Image.open(folder / f"{int(i) + 1:05d}.jpg")) for i in np.linspace(0, 39, 8).round()])
    assert np.array_equal(frames, data._resize(raw, "x", 4 * 28 * 28, 8 * 28 * 28, video=True))  # video's resize
    assert np.abs(frames.mean(axis=(1, 2, 3)) - grey).max() < STEP / 2


@pytest.mark.parametrize("fps", ["missing", None, "3", 0, -3, True, float("nan"), float("inf")])
def test_a_frame_folder_without_a_positive_fps_names_file_record_and_problem_id(tmp_path, tokenizer, fps):
    write_frames(tmp_path / TVQA_PATH, 20)
    record = frame_record()
    if fps == "missing":
        del record["fps"]
    else:
        record["fps"] = fps
    records, _ = data.load_records(write_json(tmp_path / "eval_mvbench.json", [record]))
    with pytest.raises(DataError, match=r"eval_mvbench.json record 0 \(problem_id 1601\): .*clip_14.mp4: a folder of "
                                        r"frames needs the record's 'fps' \(its frames per second\) as a positive"):
        data.load_example(records[0], tokenizer, FRAME_CONFIG)
    if fps == "missing":  # an mp4 file has its own timing: no fps needed
        (tmp_path / TVQA_PATH).rename(tmp_path / "frames")
        write_mp4(tmp_path / TVQA_PATH, 20, 3)
        assert data.load_example(records[0], tokenizer, FRAME_CONFIG)[1].grid_thw[0] == 6


@pytest.mark.parametrize("kind,message", [
    ("no such path", "castle_s07e04_seg02_clip_14.mp4: neither a video file nor a folder of frames"),
    ("1 frame", "castle_s07e04_seg02_clip_14.mp4: 1-frame video: a video needs at least 2 frames"),
    ("no frames", "castle_s07e04_seg02_clip_14.mp4: 0-frame video"),
    ("sizes differ", "castle_s07e04_seg02_clip_14.mp4: frames of different sizes"),
    ("corrupt frame", "00001.jpg: cannot decode image"),
])
def test_bad_frame_folders_name_the_folder(tmp_path, kind, message):
    folder = tmp_path / TVQA_PATH
    if kind == "1 frame":
        write_frames(folder, 1)
    elif kind == "no frames":
        write_frames(folder, 0)
    elif kind == "sizes differ":
        write_frames(folder, 8, size_of=lambda i: (56, 84 + 28 * (i == 7)))
    elif kind == "corrupt frame":
        write_frames(folder, 8)
        (folder / "00001.jpg").write_bytes(b"not a jpeg")
    limits = {k: FRAME_CONFIG[k] for k in data.FRAME_LIMITS}
    with pytest.raises(DataError, match="problem_id 1601") as err:
        record = dict(frame_record(), path=str(folder), json="eval_mvbench.json", index=0)
        data.load_example(record, None, FRAME_CONFIG)
    assert message in str(err.value)
    with pytest.raises(DataError, match=message):
        data.read_media(dict(frame_record(), path=str(folder)), **limits)

# ----------------------------------------------------------------------------- patches and prompts


def test_image_clip_equals_qwen_image_processor(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    clip = data.make_clip(data.read_image(str(tmp_path / "x.png")), None)
    hf = Qwen2VLImageProcessorPil()(images=Image.fromarray(image), return_tensors="pt")
    assert clip.grid_thw == tuple(hf["image_grid_thw"][0].tolist()) == (1, 4, 6)
    assert clip.pixel_values.dtype == torch.float32
    assert (clip.pixel_values - hf["pixel_values"]).abs().max().item() == 0.0
    assert not clip.is_video and clip.second_per_grid == 1.0 and clip.num_tokens == 6


def test_video_clip_layout():
    """Frames 0,1 form temporal patch 0 and frames 2,3 patch 1; inside a patch, dim 1 of (C, T, 14, 14) is time."""
    rng = np.random.default_rng(1)
    a, b, c, d = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    clip = data.make_clip(np.stack([a, b, c, d]), fps=2.0)
    assert clip.grid_thw == (2, 4, 6) and clip.is_video and clip.second_per_grid == 1.0 and clip.num_tokens == 12
    image_processor = Qwen2VLImageProcessorPil()
    patches = clip.pixel_values.view(2, 24, 3, 2, 14, 14)
    for t, frames in enumerate([(a, b), (c, d)]):
        for k, frame in enumerate(frames):
            ref = image_processor(images=Image.fromarray(frame), return_tensors="pt")["pixel_values"]
            assert torch.equal(patches[t, :, :, k], ref.view(24, 3, 2, 14, 14)[:, :, 0])


def test_make_clip_rejects_odd_frames_and_bad_sizes():
    with pytest.raises(AssertionError, match="3 frames of 56x56: off the patch grid"):
        data.make_clip(np.zeros((3, 56, 56, 3), np.uint8), 2.0)
    with pytest.raises(AssertionError, match="2 frames of 56x70: off the patch grid"):
        data.make_clip(np.zeros((2, 56, 70, 3), np.uint8), 2.0)


@pytest.mark.parametrize("n", [2, 8])
def test_shuffle_is_never_the_identity(n):
    frames = np.arange(n)[:, None, None, None] * np.ones((1, 28, 28, 3), np.uint8)
    for seed in range(300):
        shuffled = data.contrast_frames(frames, np.random.default_rng(seed))
        order = shuffled[:, 0, 0, 0]
        assert sorted(order) == list(range(n)) and list(order) != list(range(n))
    again = data.contrast_frames(frames, np.random.default_rng(5))
    assert np.array_equal(again, data.contrast_frames(frames, np.random.default_rng(5)))


def test_shuffled_patches_differ_from_ordered():
    frames = np.random.default_rng(0).integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    shuffled = data.contrast_frames(frames, np.random.default_rng(0))
    ordered, contrast = data.make_clip(frames, 2.0), data.make_clip(shuffled, 2.0)
    assert ordered.grid_thw == contrast.grid_thw and not torch.equal(ordered.pixel_values, contrast.pixel_values)


def test_question_text_multiple_choice():
    record = good_records()[0]
    text = data.question_text(record)
    assert text.startswith("Where does the square go?Options:\nA. left\nB. right\n\nPlease think about")
    assert text.endswith(data.TYPE_SUFFIX["multiple choice"])
    assert data.TYPE_SUFFIX["multiple choice"] == (" Please provide only the single option letter (e.g., A, B, C, "
                                                   "D, etc.) within the <answer> </answer> tags.")
    assert ("other natural language thought expressions It's encouraged to include self-reflection or verification "
            "in the reasoning process. Provide your detailed reasoning between the <think> and </think> tags, and "
            "then give your final answer between the <answer> and </answer> tags.") in text
    assert data.question_text(good_records()[1]).endswith(
        "Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.")
    assert set(data.TYPE_SUFFIX) == set(rewards.PROBLEM_TYPES)


@pytest.mark.parametrize("is_video", [True, False])
def test_encode_prompt_marks_media_tokens(tokenizer, is_video):
    record = good_records()[0 if is_video else 1]
    frames = np.zeros((4 if is_video else 2, 56, 84, 3), np.uint8)
    clip = data.make_clip(frames, 2.0 if is_video else None)
    ids, mm_types = data.encode_prompt(tokenizer, record, clip, max_tokens=1000)
    pad = "<|video_pad|>" if is_video else "<|image_pad|>"
    pad_id = tokenizer.convert_tokens_to_ids(pad)
    assert len(ids) == len(mm_types) and ids.count(pad_id) == clip.num_tokens
    assert mm_types == [(2 if is_video else 1) if i == pad_id else 0 for i in ids]
    before, after = data.chat_template(clip)
    prompt = before + data.question_text(record) + after
    assert tokenizer.decode(ids) == prompt
    assert ids == tokenizer(prompt, add_special_tokens=False).input_ids  # template and text encoded apart: same ids
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|>" + pad)
    assert prompt.endswith(pad + "<|vision_end|>" + data.question_text(record) +
                           "<|im_end|>\n<|im_start|>assistant\n")


def test_sft_target(tmp_path):
    path = write_json(tmp_path / "cot.json", good_records())
    records, _ = data.load_records(path)
    assert data.sft_target(records[1]) == "<think>I count 3.</think>\n<answer>3</answer>"
    with pytest.raises(DataError, match=r"cot.json record 0 \(problem_id 1\): 'process' missing"):  # SFT needs it
        data.load_records(path, required=("process",))
    records, skipped = data.load_records(path, skip_bad=True, required=("process",))
    assert skipped == 1 and [r["index"] for r in records] == [1]


# every special token of Qwen2.5-VL's tokenizer (the test tokenizer has the first seven; the others stay text anyway)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                "<|quad_start|>", "<|quad_end|>", "<|vision_pad|>"]


@pytest.mark.parametrize("is_video", [True, False])
def test_special_tokens_in_the_data_stay_plain_text(tokenizer, is_video):
    """A scraped question holding <|im_end|> or <|video_pad|> must not end the turn or add media slots: only the chat
    template's own markers are control tokens."""
    assert set(tokenizer.all_special_tokens) <= set(QWEN_SPECIAL)
    injected = "".join(QWEN_SPECIAL)
    record = dict(good_records()[0 if is_video else 1], problem=f"Is {injected} here?\n{injected}")
    if is_video:
        record["options"] = [f"A. {injected}", "B. right"]
    clip = data.make_clip(np.zeros((4 if is_video else 2, 56, 84, 3), np.uint8), 2.0 if is_video else None)
    ids, mm_types = data.encode_prompt(tokenizer, record, clip, max_tokens=10_000)
    before, after = data.chat_template(clip)
    assert tokenizer.decode(ids) == before + data.question_text(record) + after
    n_before, n_after = (len(tokenizer(text, add_special_tokens=False).input_ids) for text in (before, after))
    text_ids = ids[n_before:len(ids) - n_after]
    assert tokenizer.decode(text_ids) == data.question_text(record)
    assert not set(text_ids) & set(tokenizer.all_special_ids)
    assert mm_types.count(2 if is_video else 1) == clip.num_tokens and mm_types.count(2 if not is_video else 1) == 0
    control = lambda token: ids.count(tokenizer.convert_tokens_to_ids(token))
    assert (control("<|im_start|>"), control("<|im_end|>"), control("<|vision_start|>")) == (3, 2, 1)  # the template's
