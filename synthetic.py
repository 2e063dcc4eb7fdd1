"""Synthetic video task in the Video-R1 JSON format: the project's default data, small enough for a tiny model.

Clips are a few frames of big, flat-coloured shapes on a dark background. Temporal families need the frame
ORDER (shuffling the frames destroys their answer); control families do not (shuffling keeps it).

| family     | problem_type    | temporal | data_type    | answer                                       |
|------------|-----------------|----------|--------------|----------------------------------------------|
| direction  | multiple choice | yes      | video        | letter of left / right / up / down           |
| order      | multiple choice | yes      | video        | letter of the colour shown first (4 colours) |
| size       | multiple choice | yes      | video        | letter of growing / shrinking                |
| cross      | numerical       | yes      | video        | first frame (1-based) past the middle, 2..F  |
| cross_time | regression      | yes      | video        | that frame's time in seconds, e.g. 1.5       |
| ocr        | OCR             | yes      | video        | colour words in order, e.g. "red blue red"   |
| describe   | free-form       | yes      | video        | "the red square moves from left to right"    |
| colour     | multiple choice | no       | video, image | letter of the colour (4 colours)             |
| shape      | multiple choice | no       | video, image | letter of square / circle / triangle         |
| count      | numerical       | no       | video, image | number of objects, 1 to 4                    |

Records are spread evenly over the families; within a family the MC letter, the count and the crossing frame
cycle, so answers are balanced, and every second control record is an image. Colour, shape and position are
random per record. Usage: python synthetic.py out/synthetic [--seed 0] [--n_sft 800 --n_rl 400 --n_eval 240]
"""
import argparse
import json
import os
import time

import av
import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# few colours, far apart in RGB and in chroma, so they stay apart after H.264's 4:2:0 subsampling
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (240, 220, 40)}
SHAPES = ["square", "circle", "triangle"]
BACKGROUND = (16, 16, 16)
OBJ_FRAC = 0.34   # object side / frame side: 19 px at 56 px (8 px was not learnable, 18 px was)
BIG_FRAC = 0.72   # the largest object of the size family (the smallest is OBJ_FRAC)
OCR_FRAC = 0.8    # side of the OCR "word" block
GAP_FRAC = 0.08   # cross families: the object's centre stays this far off the middle line
QP = "0"          # lossless H.264: at CRF 12 x264's bits (and so the pixels) varied run to run, even on 1 thread
FRAMES_PER_WORD = 2  # one OCR word per Qwen2.5-VL temporal patch (2 frames)
# direction -> (where the object starts, where it ends, free-form wording)
MOTION = {"left": ("at the right", "at the left", "right to left"),
          "right": ("at the left", "at the right", "left to right"),
          "up": ("at the bottom", "at the top", "bottom to top"),
          "down": ("at the top", "at the bottom", "top to bottom")}
SPLITS = ("sft", "rl", "eval")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TINY_VOCAB = 512  # the synthetic task's text needs few merges; a small vocab keeps the tiny model at ~0.7 M params


def paint(W, objs):
    """One RGB frame with objs = [(shape, colour, centre x, centre y, side)]."""
    img = np.empty((W, W, 3), np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[:W, :W] + 0.5  # pixel centres
    for shape, colour, cx, cy, s in objs:
        dx, dy = xx - cx, yy - cy
        if shape == "square":
            m = (abs(dx) <= s / 2) & (abs(dy) <= s / 2)
        elif shape == "circle":
            m = dx * dx + dy * dy <= (s / 2) ** 2
        else:  # triangle, apex up, base s wide
            m = (abs(dy) <= s / 2) & (abs(dx) <= (dy + s / 2) / 2)
        img[m] = COLOURS[colour]
    return img


def pick(rng, k=1):
    """k distinct random colours and k random shapes."""
    return [list(COLOURS)[j] for j in rng.permutation(len(COLOURS))[:k]], [str(s) for s in rng.choice(SHAPES, k)]


# Scenes: (rng, slot, frames F, size W, fps) -> (frames, facts for the FAMILIES templates). `slot` counts up
# within a family; each scene cycles its answers with it (periods chosen so that no attribute predicts another),
# so every family's answers, and with fixed option order its letters, are balanced.
def moving(rng, slot, F, W, fps):
    """One object crossing the frame; direction, colour and shape cycle with co-prime periods."""
    colour, shape = list(COLOURS)[(slot + slot // 4) % 4], SHAPES[(slot + slot // 12) % 3]
    d, s = list(MOTION)[slot % 4], round(OBJ_FRAC * W)
    lo, hi, span = s / 2 + 1, W - s / 2 - 1, 0.1 * W
    along = np.linspace(rng.uniform(lo, lo + span), rng.uniform(hi - span, hi), F)
    along, across = along if d in ("right", "down") else along[::-1], rng.uniform(lo, hi)
    xys = [(a, across) if d in ("left", "right") else (across, a) for a in along]
    start, end, path = MOTION[d]
    frames = [paint(W, [(shape, colour, x, y, s)]) for x, y in xys]
    return frames, dict(colour=colour, shape=shape, d=d, start=start, end=end, path=path)


def order(rng, slot, F, W, fps):
    """One object alone in the first half, another alone in the second: equal frame counts, so only order tells."""
    c1 = list(COLOURS)[slot % 4]
    c2, (s1, s2) = str(rng.choice([c for c in COLOURS if c != c1])), [str(x) for x in rng.choice(SHAPES, 2)]
    s = round(OBJ_FRAC * W)
    objs = [(sh, c, *rng.uniform(s / 2 + 1, W - s / 2 - 1, 2), s) for sh, c in ((s1, c1), (s2, c2))]
    return [paint(W, [objs[t >= F // 2]]) for t in range(F)], dict(c1=c1, c2=c2, s1=s1, s2=s2)


def growth(rng, slot, F, W, fps):
    """One object growing from OBJ_FRAC to BIG_FRAC of the frame, or shrinking back."""
    (colour,), (shape,) = pick(rng)
    grow, big = slot % 2 == 0, BIG_FRAC * W
    cx, cy = rng.uniform(big / 2, W - big / 2, 2)
    word, first, last = ("growing", "small", "big") if grow else ("shrinking", "big", "small")
    sides = np.linspace(OBJ_FRAC * W, big, F)[:: 1 if grow else -1]
    frames = [paint(W, [(shape, colour, cx, cy, s)]) for s in sides]
    return frames, dict(colour=colour, shape=shape, word=word, first=first, last=last)


def crossing(rng, slot, F, W, fps):
    """Horizontal motion past the middle at frame k (cycled 2..F): before k on one side, from k on the other.
    Shuffled, the side counts (k - 1 and F + 1 - k) leave k and F + 2 - k equally likely: the direction is lost."""
    (colour,), (shape,) = pick(rng)
    s, k, rightward = round(OBJ_FRAC * W), 2 + slot % (F - 1), rng.integers(2) == 0
    lo, mid, gap = s / 2 + 1, W / 2, GAP_FRAC * W
    xs = np.concatenate([np.linspace(lo, mid - gap, k - 1), np.linspace(mid + gap, W - lo, F - k + 1)])
    y = rng.uniform(lo, W - lo)
    a, b = ("left", "right") if rightward else ("right", "left")
    t = str(round((k - 1) / fps, 2))  # frame k is shown at (k - 1) / fps seconds; str keeps a decimal: "3.0"
    frames = [paint(W, [(shape, colour, x if rightward else W - x, y, s)]) for x in xs]
    return frames, dict(colour=colour, shape=shape, a=a, b=b, before=k - 1, k=k, t=t)


def ocr(rng, slot, F, W, fps):
    """No font is legible at 56 px, so each "word" (a colour name) is drawn as one big block of that colour."""
    words = [str(rng.choice(list(COLOURS)))]
    while len(words) < F // FRAMES_PER_WORD:  # no word twice in a row, so the word boundaries stay visible
        words.append(str(rng.choice([c for c in COLOURS if c != words[-1]])))
    frames = [paint(W, [("square", words[t // FRAMES_PER_WORD], W / 2, W / 2, OCR_FRAC * W)]) for t in range(F)]
    return frames, dict(text=" ".join(words), listed=", then ".join(words))


def count(rng, slot, F, W, fps):
    """1 to 4 (cycled) objects of distinct colours, one per quadrant so they never touch; a still clip."""
    n = slot % 4 + 1
    colours, shapes = pick(rng, n)
    jitter = rng.uniform(-0.05 * W, 0.05 * W, (n, 2))
    objs = [(sh, c, (q % 2 + 0.5) * W / 2 + jx, (q // 2 + 0.5) * W / 2 + jy, round(OBJ_FRAC * W))
            for sh, c, q, (jx, jy) in zip(shapes, colours, rng.permutation(4), jitter)]
    names = [f"a {c} {sh}" for sh, c in zip(shapes, colours)]
    listed = names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return [paint(W, objs)] * F, dict(n=n, listed=listed)


MOVED = "In the first frames the {colour} {shape} is {start}; in the last frames it is {end}."
CROSSED = "The {colour} {shape} is at the {a} up to frame {before} and at the {b} from frame {k}"
# name -> (scene, temporal, problem_type, question, MC choices, answer template, reasoning template)
FAMILIES = {
    "direction": (moving, True, "multiple choice", "Which way does the object move?", list(MOTION),
                  "{d}", MOVED + " So it moves {d}."),
    "order": (order, True, "multiple choice", "Which colour appears first?", list(COLOURS),
              "{c1}", "The {c1} {s1} is shown in the first frames and the {c2} {s2} in the last frames. "
                      "So {c1} comes first."),
    "size": (growth, True, "multiple choice", "Is the object growing or shrinking?", ["growing", "shrinking"],
             "{word}", "In the first frames the {colour} {shape} is {first}; in the last frames it is {last}. "
                       "So it is {word}."),
    "cross": (crossing, True, "numerical", "At which frame does the object cross the middle?", None,
              "{k}", CROSSED + "."),
    "cross_time": (crossing, True, "regression", "At what time in seconds does the object cross the middle?", None,
                   "{t}", CROSSED + ", which is at {t} seconds."),
    "ocr": (ocr, True, "OCR", "Read the colour words in the video in order.", None,
            "{text}", "The blocks show {listed}."),
    "describe": (moving, True, "free-form", "Describe how the object moves.", None,
                 "the {colour} {shape} moves from {path}", MOVED),
    "colour": (moving, False, "multiple choice", "What colour is the object?", list(COLOURS),
               "{colour}", "The object is a {colour} {shape}. So its colour is {colour}."),
    "shape": (moving, False, "multiple choice", "What shape is the object?", SHAPES,
              "{shape}", "The object is a {colour} {shape}. So its shape is {shape}."),
    "count": (count, False, "numerical", "How many objects are there?", None,
              "{n}", "I see {listed}. So the count is {n}."),
}


def mc(answer, choices):
    """Options in the family's fixed order, so that a letter always means the same thing: a tiny model can then
    learn "red -> A" directly (with shuffled options it must also bind letters to words, which it did not learn
    in 600 SFT steps: every family stayed at chance). Answers are drawn uniformly, so letters stay balanced."""
    return [f"{'ABCD'[j]}. {c}" for j, c in enumerate(choices)], "ABCD"[choices.index(answer)]


def write_mp4(path, frames, fps):
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": QP})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def make_split(out_dir, split, n, seed, first_id, F, W, fps):
    rng = np.random.default_rng([seed, SPLITS.index(split)])  # per split: eval does not change with n_sft
    names, seen, records = list(FAMILIES), dict.fromkeys(FAMILIES, 0), []
    for i, f in enumerate(rng.permutation(np.resize(np.arange(len(names)), n))):  # families evenly spread
        family, k = names[f], seen[names[f]]
        seen[family] += 1
        scene, temporal, ptype, question, choices, answer, think = FAMILIES[family]
        image = not temporal and k % 2 == 1  # every second control record is an image ...
        slot = k if temporal else k // 2  # ... and the answers cycle independently of that
        frames, facts = scene(rng, slot, F, W, fps)
        answer, think = answer.format(**facts), think.format(**facts)
        rec = {"problem_id": first_id + i, "problem": question, "data_type": "image" if image else "video",
               "problem_type": ptype}
        if choices:
            rec["options"], answer = mc(answer, choices)
        path = f"images/{split}_{i:05d}.png" if image else f"videos/{split}_{i:05d}.mp4"
        if image:
            Image.fromarray(frames[0]).save(os.path.join(out_dir, path))
        else:
            write_mp4(os.path.join(out_dir, path), frames, fps)
        records.append(rec | {"process": f"<think>{think}</think>", "solution": f"<answer>{answer}</answer>",
                              "path": f"./{path}", "data_source": f"synthetic/{family}", "temporal": temporal,
                              "family": family})
    return records


def generate(out_dir, seed=0, n_sft=800, n_rl=400, n_eval=240, frames=8, size=56, fps=2):
    """Write the task under out_dir; returns {"sft": path, "rl": path, "eval": path} of the JSON files."""
    # even frame counts and multiples of 28 px map exactly onto Qwen2.5-VL's 2-frame, 28-px patches
    assert 8 <= frames <= 16 and frames % 2 == 0 and size % 28 == 0, "8-16 frames, even; size a multiple of 28"
    for sub in ("videos", "images"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    paths, first_id = {}, 0
    for split, n in zip(SPLITS, (n_sft, n_rl, n_eval)):
        paths[split] = os.path.join(out_dir, f"{split}.json")
        with open(paths[split], "w") as fh:
            json.dump(make_split(out_dir, split, n, seed, first_id, frames, size, fps), fh, indent=1)
        first_id += n
    return paths


# ----------------------------------------------------------------------------- the tiny model the default run trains

def build_tokenizer(texts, vocab_size=TINY_VOCAB):
    """A byte-level BPE tokenizer trained on `texts`, carrying Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


def tiny_config(tokenizer):
    """A Qwen2.5-VL of the released architecture, only small: 2 text layers of width 128, a 2-block vision tower."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    # tokens_per_second 2 as in the 7B checkpoint, so temporal spacing behaves as at paper scale
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  fullatt_block_indexes=[1], window_size=112, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def ensure_tiny_model(path, texts, seed=0):
    """Write the tiny model + tokenizer to `path` once, so every script loads it like a real checkpoint folder."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer))
    tmp = path.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    for name, default in (("n_sft", 800), ("n_rl", 400), ("n_eval", 240), ("frames", 8), ("size", 56), ("fps", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    t0 = time.time()
    for split, path in generate(**vars(args)).items():
        print(f"{split}: {path}")
    print(f"generated in {time.time() - t0:.1f} s")
