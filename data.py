"""Video-R1 data: JSON records, frame sampling and resizing, the Qwen2.5-VL and Qwen3-VL patch
layouts, prompts and SFT targets."""
import os
import re
import sys
import json
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple
import numpy as np
import torch
import decord
from PIL import Image
import family
import rewards

# "frame": a video stored as a folder of frames (MVBench's TVQA), or as the video file it names
DATA_TYPES = ("image", "video", "frame")
PROMPT_TEMPLATE = (
    "{Question}\nPlease think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', "
    "'oh, I see', 'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your "
    "final answer between the <answer> and </answer> tags.")
_NUMBER_SUFFIX = (" Please provide the numerical value (e.g., 42 or 3.14) within the <answer> "
                  "</answer> tags.")
TYPE_SUFFIX = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) "
                       "within the <answer> </answer> tags.",
    "numerical": _NUMBER_SUFFIX,
    "regression": _NUMBER_SUFFIX,
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer "
           "within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
}
# The synthetic task's prompt: one line where the reasoning template has six. The toy's questions
# are ~16 tokens and its clips 16: with the template, 191 of a question's ~207 user tokens were the
# template, repeated in every rollout and loss row. Paper scale keeps the template word for word.
SHORT_TEMPLATE = ("{Question}\nThink between <think> and </think>, then answer between <answer> "
                  "and </answer>.")
SHORT_SUFFIX = {
    "multiple choice": " Answer with the option letter.",
    "numerical": " Answer with a number.",
    "regression": " Answer with a number.",
    "OCR": " Answer with the text.",
    "free-form": " Answer in words.",
}
# a prompt style: its template (with a {Question} slot) and its answer-type suffixes
PROMPT_STYLES = {"reasoning": (PROMPT_TEMPLATE, TYPE_SUFFIX),
                 "short": (SHORT_TEMPLATE, SHORT_SUFFIX)}
# a checkpoint without a prompt_style in its config.json (a released Qwen model): the paper's
DEFAULT_PROMPT_STYLE = "reasoning"
SYSTEM_PROMPT = "You are a helpful assistant."

PATCH = 14           # Qwen2.5-VL's ViT patch side, pixels (Qwen3-VL's: family.py)
MERGE = family.MERGE  # 2x2 patches merge into one LLM token
TEMPORAL_PATCH = 2   # two consecutive frames form one temporal patch
FACTOR = PATCH * MERGE
IMAGE_MEAN = family.CLIP_MEAN  # Qwen2.5-VL's (Qwen3-VL's: family.py)
IMAGE_STD = family.CLIP_STD
MAX_ASPECT = 200     # Qwen's limit: thinner images cannot be resized to multiples of 28 sensibly
MIN_PIXELS = 4 * FACTOR * FACTOR      # = 56*56, transformers' default
MAX_PIXELS = 1280 * FACTOR * FACTOR   # transformers' default for smart_resize itself
# the paper's training frames have at most 128*28*28 pixels
TRAIN_MAX_PIXELS = 128 * FACTOR * FACTOR
# video fps outside [one frame per 10 s, a high-speed camera] means broken timing
MIN_VIDEO_FPS = 0.1
MAX_VIDEO_FPS = 1000.0
# the files of a folder of frames that are frames
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
# how T-GRPO's contrast clip shows its timestamps (Qwen3-VL): in time order, the frames shuffled
# under them, or shuffled with the frames (DETAILS.md, "The contrast with timestamps in the text")
CONTRAST_TIMESTAMPS = ("ordered", "shuffled")
# config keys of read_media
FRAME_LIMITS = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels")
# Qwen3-VL's qwen-vl-utils under a clip budget (total_pixels; 0: none): a frame's cap is at most
# 768 tokens, and at least 1.05 x min_pixels, so that a long clip's share never falls below a
# frame's floor (DETAILS.md, "Frame sampling and resizing")
VIDEO_MAX_TOKENS = 768
BUDGET_FLOOR = 1.05

REQUIRED_FIELDS = ("problem", "solution", "path", "data_type", "problem_type")
# an option's letter: "(A) ...", or "A" then ".", ")", ":", a space or the end
_OPTION_LETTER_RE = re.compile(r"\s*(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):\s]|$))")
# one pad token per merged patch in the prompt
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
MM_TYPE = {IMAGE_PAD: 1, VIDEO_PAD: 2}  # mm_token_type_ids; every other token is text (0)

class DataError(ValueError):
    """Every problem with the inputs (a bad record, a missing or undecodable media file); it names
    the file."""

def option_letter(option) -> str | None:
    """The letter an option is labelled with, or None. The forms real data uses:
    "A. text" (Video-R1, most records), "A) text" (Video-R1-260k's ArxivQA records),
    "A: text", "(A) text", "A text" (a letter, then a space) and "A" alone; leading spaces are
    ignored. The option's text itself stays as written: the prompt shows it unchanged."""
    match = _OPTION_LETTER_RE.match(option)
    if match is None:
        return None
    # group 1: the "(A)" form; group 2: every other form
    if match.group(1) is not None:
        return match.group(1)
    return match.group(2)

def _check_record(rec, required) -> str | None:
    """The first problem with one record, or None when it is valid."""
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    for field in REQUIRED_FIELDS + required:
        if field not in rec:
            return f"'{field}' missing"
        if not isinstance(rec[field], str) or not rec[field]:
            return f"'{field}' must be a non-empty string, got {rec[field]!r:.60}"
    for field, allowed in (("data_type", DATA_TYPES), ("problem_type", rewards.PROBLEM_TYPES)):
        if rec[field] not in allowed:
            return f"'{field}' is {rec[field]!r}, not one of {allowed}"

    # the ground truth every rollout is scored against
    answer = rewards.extract_answer(rec["solution"])
    if rec["problem_type"] == "multiple choice":
        opts = rec.get("options")
        if not isinstance(opts, list) or not opts or not all(isinstance(o, str) for o in opts):
            return ("'options' must be a non-empty list of strings for a multiple choice problem, "
                    f"got {opts!r:.60}")
        letters = [option_letter(o) for o in opts]
        if answer not in letters:
            return (f"'solution' answer {answer!r:.60} is not one of the option letters of "
                    f"{opts!r:.80}")
    if rec["problem_type"] in ("numerical", "regression") and rewards.to_number(answer) is None:
        return f"'solution' answer {answer!r:.60} is not a finite number"
    if not isinstance(rec.get("process", ""), str):
        return f"'process' must be a string, got {type(rec['process']).__name__}"
    return None

def load_records(json_path, root=None, skip_bad=False, required=()) -> tuple[list[dict], int]:
    """(records, number skipped) of a Video-R1 JSON list: validated copies, `path` made absolute
    (from `root`, default the JSON's folder), `index` and `json` added; none left is an error.
    Media are opened later: 260k load fast."""
    try:
        with open(json_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: cannot read a JSON file: {e}") from e
    if not isinstance(raw, list):
        raise DataError(
            f"{json_path}: expected a JSON list of records, got {type(raw).__name__}")
    if root is None:
        root = os.path.dirname(os.path.abspath(json_path))

    # validate every record; a bad one is skipped or an error (_skip)
    records = []
    for i, rec in enumerate(raw):
        problem = _check_record(rec, required)
        if problem is not None:
            _skip(DataError(f"{record_name(json_path, i, rec)}: {problem}"), skip_bad)
        else:
            path = os.path.abspath(os.path.join(root, rec["path"]))
            records.append(dict(rec, path=path, index=i, json=json_path))
    if not records:
        if not raw:
            reason = "the list is empty"
        else:
            reason = f"all {len(raw)} were bad and skipped"
        raise DataError(f"{json_path}: no records to use: {reason}")
    return records, len(raw) - len(records)

def record_name(json_path, index, rec) -> str:
    """How messages name a record: its file and list index, and its problem_id where it has one
    (how users find it in a 260k-record file; the index is only a position)."""
    name = f"{json_path} record {index}"
    if isinstance(rec, dict) and "problem_id" in rec:
        name += f" (problem_id {rec['problem_id']!r:.40})"
    return name

def _skip(err, skip_bad):
    """The one path of a bad record or example: skipped with a line on stderr under skip_bad, else
    an error."""
    if not skip_bad:
        raise err
    print(f"skipped: {err}", file=sys.stderr)

def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS,
                 max_pixels=MAX_PIXELS) -> tuple[int, int]:
    """Qwen's resize rule, as transformers' smart_resize (DETAILS.md, "Frame sampling and
    resizing")."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise DataError(f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT}")
    # the nearest multiples of factor, then scaled down or up into [min_pixels, max_pixels]
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar

def _resize(frames, path, min_pixels, max_pixels, video, factor=FACTOR) -> np.ndarray:
    """(n, H, W, 3) uint8 frames resized to one smart_resize size (multiples of `factor` pixels, a
    token's side) as qwen-vl-utils: images by PIL, video by torch."""
    try:
        h, w = smart_resize(frames.shape[1], frames.shape[2], factor=factor,
                            min_pixels=min_pixels, max_pixels=max_pixels)
    except DataError as e:
        raise DataError(f"{path}: {e}") from e
    if not video:
        resized = [Image.fromarray(f).resize((w, h), Image.BICUBIC) for f in frames]
        return np.stack([np.asarray(im) for im in resized])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (n, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False,
                                        antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

def frame_max_pixels(nframes, min_pixels, max_pixels, total_pixels, factor) -> float:
    """The pixel cap of each of a clip's nframes frames: max_pixels, or under a clip budget
    (total_pixels > 0) Qwen3-VL's qwen-vl-utils rule (DETAILS.md, "Frame sampling and resizing")."""
    if total_pixels == 0:
        return max_pixels
    # the budget split over the clip's temporal patches, two frames each sharing one token grid
    share = total_pixels / nframes * TEMPORAL_PATCH
    budgeted = min(VIDEO_MAX_TOKENS * factor * factor, share)
    lowest = int(min_pixels * BUDGET_FLOOR)
    # max_pixels can lower the budgeted cap, never raise it
    return min(max_pixels, max(budgeted, lowest))

def _resize_video(frames, path, min_pixels, max_pixels, total_pixels, factor) -> np.ndarray:
    """A video's sampled frames resized as one clip: each within frame_max_pixels of the clip."""
    cap = frame_max_pixels(len(frames), min_pixels, max_pixels, total_pixels, factor)
    return _resize(frames, path, min_pixels, cap, video=True, factor=factor)

def _num_frames(total, video_fps, fps, min_frames, max_frames) -> int:
    """qwen-vl-utils' smart_nframes: an even frame count (DETAILS.md, "Frame sampling and
    resizing")."""
    low = math.ceil(min_frames / TEMPORAL_PATCH)
    high = max_frames // TEMPORAL_PATCH
    # the frames at the requested fps, within the limits and the video's length
    n = min(max(total / video_fps * fps, low * TEMPORAL_PATCH), high * TEMPORAL_PATCH, total)
    return max(TEMPORAL_PATCH, math.floor(n / TEMPORAL_PATCH) * TEMPORAL_PATCH)

def _sample_indices(total, source_fps, fps, min_frames, max_frames) -> list[int]:
    """The indices of the frames qwen-vl-utils samples, evenly, of `total` frames shot at
    source_fps (a video file, or a folder of frames)."""
    n = _num_frames(total, source_fps, fps, min_frames, max_frames)
    return torch.linspace(0, total - 1, n).round().long().tolist()

def _sampled_video(frames, indices, total, source_fps) -> tuple[np.ndarray, float, np.ndarray]:
    """read_video's result: the frames, the real sampling fps, and each frame's time in seconds:
    its index over the source's fps (Qwen3-VL's processor)."""
    n = len(indices)
    times = np.array(indices) / source_fps  # (n,)
    return frames, n / total * source_fps, times

def read_video(path, fps=2.0, min_frames=4, max_frames=16, min_pixels=MIN_PIXELS,
               max_pixels=TRAIN_MAX_PIXELS, factor=FACTOR,
               total_pixels=0) -> tuple[np.ndarray, float, np.ndarray]:
    """Uniformly sampled, resized frames (n, H, W, 3) uint8, the real sampling fps and each frame's
    time in seconds (n,), as qwen-vl-utils samples; total_pixels > 0 is the clip's pixel budget
    (frame_max_pixels)."""
    try:
        vr = decord.VideoReader(path)
        total = len(vr)
        avg_fps = vr.get_avg_fps()
        if total < TEMPORAL_PATCH:
            raise DataError(f"{path}: {total}-frame video: "
                            f"a video needs at least {TEMPORAL_PATCH} frames")
        if not MIN_VIDEO_FPS <= avg_fps <= MAX_VIDEO_FPS:
            raise DataError(f"{path}: broken timing: {avg_fps:.3g} fps, "
                            f"outside [{MIN_VIDEO_FPS}, {MAX_VIDEO_FPS}]")
        indices = _sample_indices(total, avg_fps, fps, min_frames, max_frames)
        frames = vr.get_batch(indices).asnumpy()
    # decord raises these for unreadable or truncated files
    except (RuntimeError, decord.DECORDError) as e:
        # decord appends C++ traces: keep the first line
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = lines[0][:200]
        raise DataError(f"{path}: cannot decode video: {reason}") from e
    frames = _resize_video(frames, path, min_pixels, max_pixels, total_pixels, factor)
    return _sampled_video(frames, indices, total, avg_fps)

def _decode_image(path) -> np.ndarray:
    """The image file's pixels, (H, W, 3) uint8 RGB."""
    try:
        with warnings.catch_warnings():
            # PIL only warns below 2x its limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    # PIL: UnidentifiedImageError / truncated data / bad header fields / a header claiming
    # gigapixels
    except (OSError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e

def read_image(path, min_pixels=MIN_PIXELS, max_pixels=TRAIN_MAX_PIXELS,
               factor=FACTOR) -> np.ndarray:
    """The resized RGB image repeated to (TEMPORAL_PATCH, H, W, 3) uint8, as Qwen fills an image's
    temporal patch."""
    rgb = _decode_image(path)
    frame = _resize(rgb[None], path, min_pixels, max_pixels, video=False, factor=factor)
    return np.repeat(frame, TEMPORAL_PATCH, axis=0)

def read_frame_folder(path, folder_fps, fps=2.0, min_frames=4, max_frames=16,
                      min_pixels=MIN_PIXELS, max_pixels=TRAIN_MAX_PIXELS, factor=FACTOR,
                      total_pixels=0) -> tuple[np.ndarray, float, np.ndarray]:
    """A folder of frames (image files sorted by name: 00001.jpg, 00002.jpg, ...) read as a video
    shot at folder_fps (the record's `fps`), sampled and resized as read_video samples a file."""
    # bool is an int to Python, and a frame rate of True means a wrong field
    is_number = isinstance(folder_fps, (int, float)) and not isinstance(folder_fps, bool)
    if not is_number or not math.isfinite(folder_fps) or folder_fps <= 0:
        raise DataError(f"{path}: a folder of frames needs the record's 'fps' (its frames per "
                        f"second) as a positive number, got {folder_fps!r:.60}")
    try:
        entries = os.listdir(path)
    except OSError as e:
        raise DataError(f"{path}: cannot list the folder of frames: {e}") from e
    # other files (a stray .DS_Store, a listing) are not frames
    names = sorted(n for n in entries if n.lower().endswith(FRAME_EXTENSIONS))
    total = len(names)
    if total < TEMPORAL_PATCH:
        raise DataError(f"{path}: {total}-frame video: "
                        f"a video needs at least {TEMPORAL_PATCH} frames")

    # the frames read_video would take of a video file of these frames; only those are decoded
    indices = _sample_indices(total, folder_fps, fps, min_frames, max_frames)
    decoded = [_decode_image(os.path.join(path, names[i])) for i in indices]
    sizes = {frame.shape for frame in decoded}
    if len(sizes) > 1:
        raise DataError(f"{path}: frames of different sizes {sorted(sizes)}")
    frames = _resize_video(np.stack(decoded), path, min_pixels, max_pixels, total_pixels, factor)
    return _sampled_video(frames, indices, total, folder_fps)

def _frame_folder(path) -> str | None:
    """The folder of frames a "frame" record's path names, or None: the path itself, or the path
    without its extension (MVBench ships TVQA as folders "<clip>/", Video-R1's records name them
    "<clip>.mp4")."""
    for candidate in (path, os.path.splitext(path)[0]):
        if os.path.isdir(candidate):
            return candidate
    return None

def read_media(record, fps, min_frames, max_frames, min_pixels, max_pixels, factor=FACTOR,
               total_pixels=0) -> tuple[np.ndarray, float | None, np.ndarray | None]:
    """Frames of a record's video (with the sampling fps and the frames' times) or image (fps and
    times None), in multiples of `factor` pixels; total_pixels > 0 budgets a video's pixels (not
    an image's). A "frame" record is a video: the file its path names, or else a folder of its
    frames (read_frame_folder)."""
    path = record["path"]
    kind = record["data_type"]
    if kind == "frame" and not os.path.isfile(path):
        folder = _frame_folder(path)
        if folder is None:
            raise DataError(f"{path}: neither a video file nor a folder of frames")
        return read_frame_folder(folder, record.get("fps"), fps, min_frames, max_frames,
                                 min_pixels, max_pixels, factor, total_pixels)
    if not os.path.isfile(path):
        raise DataError(f"{path}: {kind} file not found")
    if kind == "image":
        return read_image(path, min_pixels, max_pixels, factor), None, None
    return read_video(path, fps, min_frames, max_frames, min_pixels, max_pixels, factor,
                      total_pixels)

def contrast_frames(frames, rng: np.random.Generator) -> np.ndarray:
    """The frames in a random order other than their own: T-GRPO's contrast clip and eval's
    shuffled twin."""
    return frames[contrast_order(len(frames), rng)]

def contrast_order(n, rng: np.random.Generator) -> np.ndarray:
    """(n,) a random order of n frames other than their own, frame by frame (as Video-R1: the two
    frames of a temporal patch may come from far apart moments)."""
    if n < 2:
        raise ValueError(f"cannot shuffle {n} frame(s): any order of them is the original order")
    # the identity would make the contrast group an ordered one; for n=2 half the draws are it
    while True:
        perm = rng.permutation(n)
        if (perm != np.arange(n)).any():
            return perm

@dataclass
class Clip:
    pixel_values: torch.Tensor  # float32 (t*h*w, 3*TEMPORAL_PATCH*PATCH*PATCH), Qwen's patch order
    grid_thw: tuple[int, int, int]  # temporal patches, patch rows, patch columns
    is_video: bool
    # seconds covered by one temporal patch (M-RoPE's temporal spacing); 1.0 for images
    second_per_grid: float
    # Qwen3-VL: the time in seconds the prompt shows before each temporal patch; None otherwise
    timestamps: list[float] | None = None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // MERGE ** 2

def patch_timestamps(times) -> list[float]:
    """Each temporal patch's time: the mean of its two frames' times (Qwen3-VL's processor,
    _calculate_timestamps)."""
    pairs = np.asarray(times, dtype=float).reshape(-1, TEMPORAL_PATCH)  # (t, 2)
    return [float((pair[0] + pair[-1]) / 2) for pair in pairs]

def make_clip(frames, fps, times=None, fam=family.DEFAULT) -> Clip:
    """Normalise (n, H, W, 3) uint8 frames and lay them out as the family's pixel_values (what its
    processor does; done by hand because transformers' video processors need torchvision). fps
    None -> an image clip. A Qwen3-VL video carries the times of its patches (`times`: of its
    frames, in seconds)."""
    n, H, W, _ = frames.shape
    patch = fam.patch
    factor = patch * MERGE
    assert n % TEMPORAL_PATCH == H % factor == W % factor == 0, \
        f"{n} frames of {H}x{W}: off the patch grid"
    t, h, w = n // TEMPORAL_PATCH, H // patch, W // patch

    # normalise
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(fam.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(fam.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std

    # Qwen's patch order: (t, h/2, w/2, 2, 2, C, T, p, p), so merge groups stay contiguous
    x = x.reshape(t, TEMPORAL_PATCH, 3, h // MERGE, MERGE, patch, w // MERGE, MERGE, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(t * h * w, 3 * TEMPORAL_PATCH * patch * patch)
    is_video = fps is not None
    second_per_grid = 1.0
    timestamps = None
    if is_video:
        second_per_grid = TEMPORAL_PATCH / fps
    if is_video and fam.timestamps:
        timestamps = patch_timestamps(times)
    return Clip(pixel_values, (t, h, w), is_video, second_per_grid, timestamps)

def question_text(record, style=DEFAULT_PROMPT_STYLE) -> str:
    """The user turn's text: the question (with its options) in the style's template (PROMPT_STYLES:
    "reasoning" is Video-R1's), then its answer-type suffix."""
    question = record["problem"]
    # official wording: no separator before "Options:"
    if record["problem_type"] == "multiple choice":
        question += "Options:\n" + "".join(option + "\n" for option in record["options"])
    template, suffix = PROMPT_STYLES[style]
    return template.format(Question=question) + suffix[record["problem_type"]]

def prompt_style(asked, trained) -> str:
    """The prompt style to use: `asked` (a script's prompt_style) when set, else `trained`, the
    one the model was trained with (its config's prompt_style, which sft.py and tgrpo.py save with
    every checkpoint), else DEFAULT_PROMPT_STYLE (a released model's)."""
    return asked or trained or DEFAULT_PROMPT_STYLE

def chat_template(clip, fam=family.DEFAULT) -> tuple[str, str]:
    """The chat template of one user turn, (before, after) its question text (DETAILS.md, "The
    prompt"); the clip shows as its family's media text (family.py)."""
    media = fam.media_text(clip)
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{media}",
            "<|im_end|>\n<|im_start|>assistant\n")

def encode_plain(tokenizer, text) -> list[int]:
    """Ids of text from the data: an "<|im_end|>" in a scraped question stays characters, never a
    control token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

def encode_prompt(tokenizer, record, clip, max_tokens, fam=family.DEFAULT,
                  style=DEFAULT_PROMPT_STYLE) -> tuple[list[int], list[int]]:
    """Prompt ids and their mm_token_type_ids (MM_TYPE; M-RoPE needs them). Template and question
    are encoded apart (encode_plain), which gives the whole prompt's ids when the question holds no
    special token."""
    before, after = chat_template(clip, fam)
    before_ids = tokenizer(before, add_special_tokens=False).input_ids
    after_ids = tokenizer(after, add_special_tokens=False).input_ids
    ids = before_ids + encode_plain(tokenizer, question_text(record, style)) + after_ids
    if len(ids) > max_tokens:
        raise DataError(f"prompt of {len(ids)} tokens exceeds max_prompt_tokens={max_tokens}")

    # the media type of every token, and a check that each media token got its own pad token
    type_of = {tokenizer.convert_tokens_to_ids(tok): kind for tok, kind in MM_TYPE.items()}
    mm_types = [type_of.get(i, 0) for i in ids]
    pad = VIDEO_PAD if clip.is_video else IMAGE_PAD
    pads = mm_types.count(MM_TYPE[pad])
    assert pads == clip.num_tokens, \
        f"{pads} pad tokens for {clip.num_tokens} media tokens: the tokenizer split them"
    return ids, mm_types

def sft_target(record) -> str:
    """The SFT completion: the chain of thought, then the answer (DETAILS.md, "The prompt")."""
    return record["process"] + "\n" + record["solution"]

def epoch_slice(records, first, count, seed):
    """records[first : first + count] of an endless stream that reshuffles every epoch i // n
    (seeded): the data position is a plain number, so a resumed run needs no data-loader state."""
    n = len(records)
    out = []
    for i in range(first, first + count):
        # the order of the epoch position i falls in
        epoch_order = np.random.default_rng([seed, i // n]).permutation(n)
        out.append(records[epoch_order[i % n]])
    return out

class Example(NamedTuple):
    """A record loaded for training: load_example's prompt and clips beside the record."""
    record: dict
    prompt: tuple  # (prompt ids, mm types), as encode_prompt gives them
    clip: Clip
    contrast_clip: Clip | None  # the frames shuffled: videos only, given a contrast_rng
    # the contrast clip's prompt: the prompt itself unless its timestamps are shuffled too
    contrast_prompt: tuple | None = None

class Loader(NamedTuple):
    """What loading a record takes besides the record: what a data worker is sent once
    (prefetch.py)."""
    tokenizer: object
    config: dict  # FRAME_LIMITS, max_prompt_tokens, prompt_style, skip_bad, contrast_timestamps
    fam: family.Family


class Loaded(NamedTuple):
    """load_batch's result."""
    examples: list
    skipped: int  # records that skip_bad skipped
    # the generator the contrast shuffles drew from, as they left it: where a data worker loaded
    # the batch, the worker's copy, from which the main process goes on drawing
    rng: np.random.Generator | None


def loader_of(tokenizer, config, model_config) -> Loader:
    """The Loader for a model: its family's layout, and config's prompt_style resolved against the
    one the model was trained with (prompt_style)."""
    style = prompt_style(config["prompt_style"], getattr(model_config, "prompt_style", None))
    return Loader(tokenizer, config | {"prompt_style": style}, family.of(model_config))


def load_batch(loader, records, rng=None, contrast=False) -> Loaded:
    """load_examples in the loader's settings, the contrast clips (contrast=True) shuffled by
    draws from rng; a prefetch.Job's load."""
    contrast_rng = None
    if contrast:
        contrast_rng = rng
    examples, skipped = load_examples(records, loader.tokenizer, loader.config, contrast_rng,
                                      loader.fam)
    return Loaded(examples, skipped, rng)


def load_each(loader, records, rngs) -> list:
    """load_example of each record with its own contrast rng (or None), or the DataError that
    fails it (eval.py); a prefetch.Job's load."""
    out = []
    for record, rng in zip(records, rngs):
        try:
            out.append(load_example(record, loader.tokenizer, loader.config, rng, loader.fam))
        except DataError as err:
            out.append(err)
    return out


def load_examples(records, tokenizer, config, contrast_rng=None, fam=family.DEFAULT):
    """load_example per record -> [Example], and how many config's skip_bad skipped."""
    examples = []
    for record in records:
        try:
            loaded = load_example(record, tokenizer, config, contrast_rng, fam)
            examples.append(Example(record, *loaded))
        except DataError as err:
            _skip(err, config["skip_bad"])
    return examples, len(records) - len(examples)

def load_example(record, tokenizer, config, contrast_rng=None, fam=family.DEFAULT):
    """(prompt ids, mm types), the clip, and for a video given `contrast_rng` the contrast clip
    and its prompt, in `fam`'s layout; `config` gives FRAME_LIMITS, max_prompt_tokens and
    prompt_style (and, given a contrast_rng, contrast_timestamps). A DataError names the JSON file
    and record.

    The contrast clip shuffles the frames; a Qwen3-VL prompt's timestamps stay in time order
    (contrast_timestamps "ordered", so the prompt is the ordered one's) or are shuffled with them
    ("shuffled"): DETAILS.md, "The contrast with timestamps in the text"."""
    try:
        limits = {key: config[key] for key in FRAME_LIMITS}
        frames, fps, times = read_media(record, **limits, factor=fam.patch * MERGE)
        clip = make_clip(frames, fps, times, fam)
        max_tokens = config["max_prompt_tokens"]
        style = config["prompt_style"]  # resolved by the caller (prompt_style)
        prompt = encode_prompt(tokenizer, record, clip, max_tokens, fam, style)
        # an image has no frame order to break
        if contrast_rng is None or not clip.is_video:
            return prompt, clip, None, None
        order = contrast_order(len(frames), contrast_rng)
        contrast_times = times
        if config["contrast_timestamps"] == "shuffled":
            contrast_times = times[order]
        contrast_clip = make_clip(frames[order], fps, contrast_times, fam)
        contrast_prompt = prompt
        if contrast_clip.timestamps != clip.timestamps:
            contrast_prompt = encode_prompt(tokenizer, record, contrast_clip, max_tokens, fam,
                                            style)
        return prompt, clip, contrast_clip, contrast_prompt
    except DataError as err:
        name = record_name(record["json"], record["index"], record)
        raise DataError(f"{name}: {err}") from err
