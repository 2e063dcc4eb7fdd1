"""The default data, a synthetic video task in the Video-R1 JSON format, and the tiny Qwen2.5-VL
it trains.

Clips of big, flat-coloured shapes: temporal families need the frame ORDER (shuffling the frames
destroys their answer), control families do not; the ten families and their balance: DETAILS.md,
"The synthetic task".
Usage: python synthetic.py out/synthetic [--seed 0] [--n_sft 800 --n_rl 400 --n_eval 400]"""
import argparse
import inspect
import json
import os
import time

import av
import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen3VLConfig
import family

# few colours, far apart in RGB and in chroma, so they stay apart after H.264's 4:2:0 subsampling
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 220, 40),
}
SHAPES = ["square", "circle", "triangle"]
BACKGROUND = (16, 16, 16)
OBJ_FRAC = 0.34   # object side / frame side: 19 px at 56 px (8 px was not learnable, 18 px was)
SMALL_FRAC = 0.2  # the count family's objects: 11 px, one per 14-px cell
# the largest object of the size family (the smallest is OBJ_FRAC): 0.72 saturated, 0.5 chance
BIG_FRAC = 0.6
OCR_FRAC = 0.8    # side of the OCR "word" block
# lossless H.264: at CRF 12 x264's bits (and so the pixels) varied run to run, even on 1 thread
QP = "0"
FRAMES_PER_WORD = 1  # two OCR words per Qwen2.5-VL temporal patch (2 frames)
MOTION = {"left": dict(start="at the right", end="at the left", path="right to left"),
          "right": dict(start="at the left", end="at the right", path="left to right"),
          "up": dict(start="at the bottom", end="at the top", path="bottom to top"),
          "down": dict(start="at the top", end="at the bottom", path="top to bottom")}
SPLITS = ("sft", "rl", "eval")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# the synthetic task's text needs few merges; a small vocab keeps the tiny model at ~0.7 M params
TINY_VOCAB = 512
NTH = ("first", "second", "third", "fourth")
# the tiny model's prompt: one line, not the reasoning template (91 % of a question's text)
PROMPT_STYLE = "short"

def paint(W, objs):
    """One RGB frame with objs = [(shape, colour, centre x, centre y, side)]."""
    img = np.full((W, W, 3), BACKGROUND, np.uint8)
    yy, xx = np.mgrid[:W, :W] + 0.5  # pixel centres
    for shape, colour, cx, cy, s in objs:
        dx = xx - cx
        dy = yy - cy
        if shape == "square":
            m = (abs(dx) <= s / 2) & (abs(dy) <= s / 2)
        elif shape == "circle":
            m = dx * dx + dy * dy <= (s / 2) ** 2
        else:  # triangle, apex up, base s wide
            m = (abs(dy) <= s / 2) & (abs(dx) <= (dy + s / 2) / 2)
        img[m] = COLOURS[colour]
    return img

# Scenes: (rng, slot, frames F, size W, fps) -> (frames, facts for the FAMILIES templates). Each
# cycles its answers with `slot`, the count of the family's records so far (periods chosen so that
# no attribute predicts another).
def moving(rng, slot, F, W, fps):
    """One object crossing the frame; direction, colour and shape cycle with co-prime periods."""
    colour = list(COLOURS)[(slot + slot // 4) % 4]
    shape = SHAPES[(slot + slot // 12) % 3]
    d = list(MOTION)[slot % 4]
    s = round(OBJ_FRAC * W)
    # the centre's range (the object stays inside the frame); start and end vary by 10 % of W
    lo = s / 2 + 1
    hi = W - s / 2 - 1
    span = 0.1 * W
    along = np.linspace(rng.uniform(lo, lo + span), rng.uniform(hi - span, hi), F)
    if d not in ("right", "down"):
        along = along[::-1]
    across = rng.uniform(lo, hi)
    if d in ("left", "right"):
        xys = [(a, across) for a in along]
    else:
        xys = [(across, a) for a in along]
    frames = [paint(W, [(shape, colour, x, y, s)]) for x, y in xys]
    return frames, dict(colour=colour, shape=shape, d=d, **MOTION[d])

def order(rng, slot, F, W, fps):
    """The four colours one after another, F / 4 frames each; asked for the n-th (answer colour and
    n cycle). The middle ones need counting, which the tiny model does poorly (the first of two
    colours saturated at 93-98 %)."""
    c = list(COLOURS)[slot % 4]
    n = slot // 4 % 4
    s = round(OBJ_FRAC * W)
    # the other three colours in a random order, with c at place n
    rest = [str(x) for x in rng.permutation([x for x in COLOURS if x != c])]
    seq = rest[:n] + [c] + rest[n:]
    # one object per colour: a random shape at a random place
    objs = []
    for col in seq:
        shape = str(rng.choice(SHAPES))
        cx, cy = rng.uniform(s / 2 + 1, W - s / 2 - 1, 2)
        objs.append((shape, col, cx, cy, s))
    frames = [paint(W, [objs[t * 4 // F]]) for t in range(F)]
    return frames, dict(c=c, nth=NTH[n], listed=", ".join(seq))

def growth(rng, slot, F, W, fps):
    """One object growing or shrinking (alternating with slot) in place; colour and shape random."""
    colour = str(rng.permutation(list(COLOURS))[0])
    shape = str(rng.choice(SHAPES))
    big = BIG_FRAC * W
    cx, cy = rng.uniform(big / 2, W - big / 2, 2)
    sides = np.linspace(OBJ_FRAC * W, big, F)
    if slot % 2 == 0:
        word, start, end = "growing", "small", "big"
    else:
        word, start, end = "shrinking", "big", "small"
        sides = sides[::-1]
    frames = [paint(W, [(shape, colour, cx, cy, s)]) for s in sides]
    return frames, dict(colour=colour, shape=shape, word=word, start=start, end=end)

def change(rng, slot, F, W, fps):
    """One block that turns from one colour to another at frame k (cycled 2..F). Shuffled, the
    colour counts (k - 1 and F + 1 - k) leave k and F + 2 - k equally likely, as nothing tells which
    colour came first."""
    c1 = list(COLOURS)[slot % 4]
    c2 = str(rng.choice([c for c in COLOURS if c != c1]))
    k = 2 + slot // 4 % (F - 1)
    # frame k is shown at (k - 1) / fps seconds; str keeps a decimal: "3.0"
    t = str(round((k - 1) / fps, 2))
    seq = [c1] * (k - 1) + [c2] * (F - k + 1)
    frames = [paint(W, [("square", c, W / 2, W / 2, OCR_FRAC * W)]) for c in seq]
    return frames, dict(c1=c1, c2=c2, k=k, t=t, seq=", ".join(seq))

def ocr(rng, slot, F, W, fps):
    """No font is legible at 56 px, so each "word" (a colour name) is drawn as one big block of
    that colour."""
    words = [str(rng.choice(list(COLOURS)))]
    # no word twice in a row, so the word boundaries stay visible
    while len(words) < F // FRAMES_PER_WORD:
        words.append(str(rng.choice([c for c in COLOURS if c != words[-1]])))
    frames = []
    for t in range(F):
        word = words[t // FRAMES_PER_WORD]
        frames.append(paint(W, [("square", word, W / 2, W / 2, OCR_FRAC * W)]))
    return frames, dict(text=" ".join(words), listed=", then ".join(words))

def count(rng, slot, F, W, fps):
    """1 to 6 (cycled) small objects, one per cell of a 4 x 4 grid, so one 28-px token may hold
    several; still."""
    n = slot % 6 + 1
    cell = W / 4
    colours = [str(c) for c in rng.choice(list(COLOURS), n)]
    shapes = [str(s) for s in rng.choice(SHAPES, n)]
    # cell q of the grid is at row q // 4, column q % 4
    objs = [(sh, c, (q % 4 + 0.5) * cell, (q // 4 + 0.5) * cell, round(SMALL_FRAC * W))
            for sh, c, q in zip(shapes, colours, rng.permutation(16))]
    names = [f"a {c} {sh}" for sh, c in zip(shapes, colours)]
    if n == 1:
        listed = names[0]
    else:
        listed = ", ".join(names[:-1]) + " and " + names[-1]
    frame = paint(W, objs)
    frames = [frame for _ in range(F)]  # a still scene: one frame F times
    return frames, dict(n=n, listed=listed)

def pair(rng, slot, F, W, fps):
    """Two still objects, shapes and colours distinct; asked for one shape's colour, the model must
    bind the two."""
    c1 = list(COLOURS)[slot % 4]
    s1 = SHAPES[slot // 4 % 3]
    c2 = str(rng.choice([c for c in COLOURS if c != c1]))
    s2 = str(rng.choice([x for x in SHAPES if x != s1]))
    # the two objects in two random cells of a 2 x 2 grid
    objs = [(sh, c, (q % 2 + 0.5) * W / 2, (q // 2 + 0.5) * W / 2, round(OBJ_FRAC * W))
            for sh, c, q in zip((s1, s2), (c1, c2), rng.permutation(4))]
    frame = paint(W, objs)
    frames = [frame for _ in range(F)]  # a still scene: one frame F times
    return frames, dict(colour=c1, shape=s1, c2=c2, s2=s2)

FIRST_LAST = "In the first frames the {colour} {shape} is {start}; in the last frames it is {end}."
CHANGED = "The frames show {seq}. So the colour changes from {c1} to {c2} at frame {k}"
# name -> (scene, temporal, problem_type, question, MC choices, answer template, reasoning template)
FAMILIES = {
    "direction": (moving, True, "multiple choice", "Which way does the object move?",
                  list(MOTION), "{d}", FIRST_LAST + " So it moves {d}."),
    "order": (order, True, "multiple choice", "Which colour appears {nth}?",
              list(COLOURS), "{c}", "The colours come in the order {listed}. So the {nth} is {c}."),
    "size": (growth, True, "multiple choice", "Is the object growing or shrinking?",
             ["growing", "shrinking"], "{word}", FIRST_LAST + " So it is {word}."),
    "change": (change, True, "numerical", "At which frame does the colour change?",
               None, "{k}", CHANGED + "."),
    "change_time": (change, True, "regression", "At what time in seconds does the colour change?",
                    None, "{t}", CHANGED + ", which is at {t} seconds."),
    "ocr": (ocr, True, "OCR", "Read the colour words in the video in order.",
            None, "{text}", "The blocks show {listed}."),
    "describe": (moving, True, "free-form", "Describe how the object moves.",
                 None, "the {colour} {shape} moves from {path}", FIRST_LAST),
    "colour": (pair, False, "multiple choice", "What colour is the {shape}?",
               list(COLOURS), "{colour}",
               "The {shape} is {colour} and the {s2} is {c2}. So the {shape} is {colour}."),
    "shape": (moving, False, "multiple choice", "What shape is the object?",
              SHAPES, "{shape}", "The object is a {colour} {shape}. So its shape is {shape}."),
    "count": (count, False, "numerical", "How many objects are there?",
              None, "{n}", "I see {listed}. So the count is {n}."),
}

def write_mp4(path, frames, fps):
    """The frames as a lossless H.264 video (QP) at fps."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": QP})
        stream.width = frames[0].shape[1]
        stream.height = frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder

def generate(out_dir, seed=0, n_sft=800, n_rl=400, n_eval=400, frames=8, size=56, fps=2):
    """Write the task under out_dir; returns {"sft": path, "rl": path, "eval": path} of the JSON
    files."""
    # even frame counts and multiples of 28 px map exactly onto Qwen2.5-VL's 2-frame, 28-px patches
    assert 8 <= frames <= 16 and frames % 2 == 0 and size % 28 == 0, \
        "8-16 frames, even; size a multiple of 28"
    for sub in ("videos", "images"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    paths = {}
    sizes = (n_sft, n_rl, n_eval)
    for split_id, (split, n) in enumerate(zip(SPLITS, sizes)):
        # one generator per split: eval does not change with n_sft
        rng = np.random.default_rng([seed, split_id])
        records = []
        # the families evenly spread, in a random order
        families = rng.permutation(np.resize(list(FAMILIES), n)).tolist()
        for i, family in enumerate(families):
            # the scene, its question and its answer
            k = sum(r["family"] == family for r in records)  # the family's records so far
            scene, temporal, ptype, question, choices, answer, think = FAMILIES[family]
            image = not temporal and k % 2 == 1  # every second control record is an image ...
            slot = k if temporal else k // 2  # ... and the answers cycle independently of that
            clip, facts = scene(rng, slot, frames, size, fps)
            answer = answer.format(**facts)
            think = think.format(**facts)
            if image:
                data_type = "image"
                path = f"images/{split}_{i:05d}.png"
            else:
                data_type = "video"
                path = f"videos/{split}_{i:05d}.mp4"
            rec = {"problem_id": sum(sizes[:split_id]) + i, "problem": question.format(**facts),
                   "problem_type": ptype, "data_type": data_type}
            # options in the family's fixed order: a letter means one thing (DETAILS.md, "The
            # synthetic task")
            if choices:
                rec["options"] = [f"{'ABCD'[j]}. {c}" for j, c in enumerate(choices)]
                answer = "ABCD"[choices.index(answer)]

            # the media file, then the record
            if image:
                Image.fromarray(clip[0]).save(os.path.join(out_dir, path))
            else:
                write_mp4(os.path.join(out_dir, path), clip, fps)
            records.append(rec | {"process": f"<think>{think}</think>",
                                  "solution": f"<answer>{answer}</answer>",
                                  "path": f"./{path}", "temporal": temporal, "family": family})

        paths[split] = os.path.join(out_dir, f"{split}.json")
        with open(paths[split], "w") as fh:
            json.dump(records, fh, indent=1)
    return paths

# ------------------------------------------------------------ the tiny model the default run trains
def build_tokenizer(texts, vocab_size=TINY_VOCAB):
    """A byte-level BPE tokenizer trained on `texts`, carrying Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])

def tiny_config(tokenizer, model_type="qwen2_5_vl"):
    """The tiny model's config: the released architecture of Qwen2.5-VL or Qwen3-VL, only small (2
    text layers of width 128, a 2-block vision tower), with the tokenizer's special-token ids."""
    special = [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
               ("vision_start_token_id", "<|vision_start|>"),
               ("vision_end_token_id", "<|vision_end|>")]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in special}
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096,
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128)
    if model_type == "qwen3_vl":
        # interleaved M-RoPE over the 16 rotary frequencies of a 32-wide head, as [24, 20, 20]
        # over the 8B's 64; DeepStack after both vision blocks into both text layers; an 8 x 8
        # learned position table, interpolated to each grid
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                "mrope_interleaved": True}
        text.update(head_dim=32, rope_parameters=rope)
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    text.update(rope_parameters=rope)
    # tokens_per_second 2 as in the 7B checkpoint, so temporal spacing behaves as at paper scale
    vision.update(fullatt_block_indexes=[1], window_size=112, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)

def ensure_tiny_model(path, texts, seed=0, model_type="qwen2_5_vl"):
    """Write the tiny model + tokenizer to `path` once, so every script loads it like a real
    checkpoint folder (tiny_config: a Qwen2.5-VL or a Qwen3-VL)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    tokenizer = build_tokenizer(texts)
    config = tiny_config(tokenizer, model_type)
    # the toy's prompt (data.PROMPT_STYLES), which sft.py takes from here and saves onwards
    config.prompt_style = PROMPT_STYLE

    # the random weights, written to a temporary folder and renamed: `path` never holds half a model
    torch.manual_seed(seed)
    model = family.FAMILIES[model_type].model_class(config)
    tmp = path.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)

if __name__ == "__main__":
    # the summary (the docstring's first paragraph) describes the command
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    # --seed, --n_sft, ...: generate's keyword arguments
    for name, param in list(inspect.signature(generate).parameters.items())[1:]:
        p.add_argument(f"--{name}", type=int, default=param.default)
    t0 = time.time()
    for split, path in generate(**vars(p.parse_args())).items():
        print(f"{split}: {path}")
    print(f"generated in {time.time() - t0:.1f} s")
