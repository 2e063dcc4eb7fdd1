"""The one seam between the model families the scripts run, Qwen2.5-VL and Qwen3-VL: what differs,
chosen from a checkpoint's config.model_type (no flag). Everything else is shared.

What differs (DETAILS.md, "Qwen3-VL"): the ViT patch side (14 and 16 pixels), the M-RoPE positions
of a prompt, how a video shows in the prompt (one block, or one block per temporal patch after its
timestamp as text), DeepStack (vision features added to the first language layers' hidden states)
and the per-head q/k norms of Qwen3's attention."""
import json
import os
from dataclasses import dataclass
from typing import Callable
import torch
import transformers

MERGE = 2  # 2x2 patches merge into one LLM token, in both families
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as Qwen2.5-VL's processor uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's processors: transformers' IMAGENET_STANDARD_MEAN and _STD


def merged_grid(clip):
    """(t, h, w): the clip's grid in the language model's tokens (the merger joins 2x2 patches)."""
    t, h, w = clip.grid_thw
    return t, h // MERGE, w // MERGE


def qwen2_5_positions(mm_types, clip, config):
    """(3, L) Qwen2.5-VL positions of an unpadded prompt with one vision block at most, as the
    released checkpoints learnt them (DETAILS.md).

    The three rows are time, height and width. Text counts on in all three together. The vision
    token at (t, row, col) of its clip's grid sits at
    (start + t * tokens_per_second * second_per_grid, start + row, start + col),
    and the text after the block continues from the block's largest position + 1."""
    L = len(mm_types)
    pos = torch.arange(L).expand(3, L).clone()  # (3, L) all text: 0, 1, 2, ... in each row
    vision = torch.tensor(mm_types).nonzero().flatten()  # (V,) where the vision pads are
    if len(vision) == 0:
        return pos
    start = vision[0].item()
    end = vision[-1].item() + 1
    sized = end - start == len(vision) == clip.num_tokens
    assert sized, "one contiguous vision block per prompt, sized to its clip"
    t, h, w = merged_grid(clip)

    # time: a float32 product floored, exactly as Qwen's code computes it (and the checkpoints
    # learnt); images have no temporal spacing
    seconds = 0.0
    if clip.is_video:
        seconds = clip.second_per_grid
    tokens_per_second = config.vision_config.tokens_per_second
    step = torch.tensor(seconds, dtype=torch.float32) * tokens_per_second  # () float32
    frame_pos = (torch.arange(t) * step).long()  # (t,)
    rows = torch.arange(h)  # (h,)
    cols = torch.arange(w)  # (w,)
    grid = torch.meshgrid(frame_pos, rows, cols, indexing="ij")  # 3 x (t, h, w)
    block = torch.stack(grid).reshape(3, -1) + start  # (3, V)
    pos[:, start:end] = block
    pos[:, end:] = block.max() + 1 + torch.arange(L - end)  # (3, L - end)
    return pos


def qwen3_positions(mm_types, clip, config):
    """(3, L) Qwen3-VL positions of an unpadded prompt (transformers' get_rope_index).

    Every run of vision pads is one block: an image, or one temporal patch of a video (its
    timestamp, text, sits before it). Inside a block the time row is the block's start and rows and
    columns count from it; the text after a block resumes at its largest position + 1. Time lives in
    the timestamps, not in the positions. (Interleaving the three rows over the rotary dimensions is
    the rotary embedding's business, not the positions'.)"""
    types = torch.tensor(mm_types)  # (L,)
    L = len(types)
    pos = torch.zeros(3, L, dtype=torch.long)  # (3, L)
    # the runs of one type: a text span or one vision block
    changes = (types[1:] != types[:-1]).nonzero().flatten() + 1
    bounds = [0] + changes.tolist() + [L]
    next_pos = 0
    blocks = 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if types[start] == 0:
            pos[:, start:end] = next_pos + torch.arange(end - start)  # (3, n)
            next_pos += end - start
            continue
        _, h, w = merged_grid(clip)
        assert end - start == h * w, "a vision block is one temporal patch of its clip"
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) x 2
        pos[0, start:end] = next_pos
        pos[1, start:end] = next_pos + rows.flatten()
        pos[2, start:end] = next_pos + cols.flatten()
        next_pos += max(h, w)
        blocks += 1
    if blocks:
        assert blocks == clip.grid_thw[0], "one block per temporal patch of the clip"
    return pos


def one_block(clip):
    """Qwen2.5-VL's media text: the clip's pads, all in one block."""
    pad = "<|video_pad|>" if clip.is_video else "<|image_pad|>"
    return "<|vision_start|>" + pad * clip.num_tokens + "<|vision_end|>"


def timestamped_blocks(clip):
    """Qwen3-VL's media text (its processor's replace_video_token): an image as one block; a video
    as one block per temporal patch, each after its time `<{t:.1f} seconds>`."""
    if not clip.is_video:
        return one_block(clip)
    _, h, w = merged_grid(clip)
    pads = "<|video_pad|>" * (h * w)
    return "".join(f"<{seconds:.1f} seconds><|vision_start|>{pads}<|vision_end|>"
                   for seconds in clip.timestamps)


@dataclass(frozen=True)
class Family:
    class_name: str        # its transformers class, imported where a model is built (model_class)
    patch: int             # the ViT's patch side in pixels; a token covers MERGE x MERGE patches
    image_mean: tuple      # the pixels' normalisation, per RGB channel
    image_std: tuple
    positions: Callable    # (mm_types, clip, config) -> (3, L) positions of an unpadded prompt
    media_text: Callable   # clip -> the prompt text that stands for the clip
    timestamps: bool       # a video clip carries its temporal patches' times, the prompt shows them
    deepstack: bool        # the vision tower's DeepStack features join the first language layers
    qk_norm: bool          # attention normalises q and k per head before RoPE

    @property
    def model_class(self):
        """The transformers class, imported on first use: its module pulls in most of transformers
        (about 5 s of CPU), which a data worker, decoding clips and writing prompts, never needs."""
        return getattr(transformers, self.class_name)


FAMILIES = {
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", 14, CLIP_MEAN, CLIP_STD,
                         qwen2_5_positions, one_block,
                         timestamps=False, deepstack=False, qk_norm=False),
    "qwen3_vl": Family("Qwen3VLForConditionalGeneration", 16, HALF, HALF,
                       qwen3_positions, timestamped_blocks,
                       timestamps=True, deepstack=True, qk_norm=True),
}
DEFAULT = FAMILIES["qwen2_5_vl"]


def of(config):
    """The family of a loaded model's config."""
    return by_type(config.model_type)


def of_folder(path):
    """The family of a checkpoint folder, read from its config.json."""
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    return by_type(model_type, where=f"{path}: ")


def by_type(model_type, where=""):
    """FAMILIES[model_type], or a ValueError (prefixed by `where`) naming the types there are."""
    if model_type not in FAMILIES:
        raise ValueError(f"{where}model_type {model_type!r} is none of {sorted(FAMILIES)}")
    return FAMILIES[model_type]
