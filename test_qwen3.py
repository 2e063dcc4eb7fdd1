"""Qwen3-VL through the same code as Qwen2.5-VL: the family read from the checkpoint, its positions, prompt and
forward equal to transformers' on the tiny Qwen3-VL."""
import json
import math
import os
import re
import types
import numpy as np
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
import data
import family
import lifecycle
import model as M
import synthetic
from conftest import assert_matches_transformers, encode_text, ours_with_grads, random_clip, run_eval, run_script


def test_tiny_qwen3_loads_as_its_family(tiny3, tiny):
    net, tok, path = tiny3
    assert isinstance(net, Qwen3VLForConditionalGeneration)
    assert family.of(net.config) is family.of_folder(path) is family.FAMILIES["qwen3_vl"]
    assert family.of(tiny[0].config) is family.DEFAULT
    assert tok.get_vocab() == tiny[1].get_vocab()  # the tiny Qwen2.5-VL's tokenizer
    again, _ = lifecycle.load_model(path, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


QWEN3 = family.FAMILIES["qwen3_vl"]


def clip3(t, height, width, is_video=True, seed=0):
    """A Qwen3-VL clip of random pixels: 16-px patches, its patches 1 s apart."""
    return random_clip(t, height, width, is_video=is_video, seed=seed, patch=QWEN3.patch)


def batch3(net, tok, texts, clips, row_clip):
    encoded = [encode_text(tok, text, None if c is None else clips[c], QWEN3) for text, c in zip(texts, row_clip)]
    return M.collate_prompts(encoded, clips, tok.pad_token_id, net.config, row_clip=row_clip)


def media_inputs(batch):
    """transformers' pixel inputs of a batch: each row's clip repeated for the row, images and videos apart."""
    inputs = {}
    for kind, is_video in (("image", False), ("video", True)):
        shown = [batch.clips[c] for c in batch.row_clip if c is not None and batch.clips[c].is_video == is_video]
        if shown:
            key = "pixel_values_videos" if is_video else "pixel_values"
            inputs[key] = torch.cat([clip.pixel_values for clip in shown])
            inputs[f"{kind}_grid_thw"] = torch.tensor([clip.grid_thw for clip in shown])
    return inputs


POSITION_CASES = {
    "image": ([("what colour is it?", (1, 64, 64, False))], [0]),
    "wide image": ([("what colour?", (1, 64, 128, False))], [0]),
    "tall image": ([("what colour?", (1, 128, 64, False))], [0]),
    "video of 1 patch": ([("which way?", (1, 64, 64, True))], [0]),
    "video of 2 patches": ([("which way?", (2, 64, 96, True))], [0]),
    "video of 8 patches": ([("which way does the object move?", (8, 64, 64, True))], [0]),
    "tall video of 8 patches": ([("which way?", (8, 96, 64, True))], [0]),
    "text only": ([("hello there", None)], [None]),
    "long text after": ([("red " * 40, (2, 64, 64, True))], [0]),
    "left padding": ([("which way?", (2, 64, 96, True)), ("what colour is the big square?", (1, 64, 128, False)),
                      ("hi", None), ("it moves right", (8, 64, 64, True))], [0, 1, None, 2]),
    "rows share a clip": ([("which way?", (2, 64, 64, True)), ("red", None), ("the blue one, first or last?", None)],
                          [0, None, 0]),
}


@pytest.mark.parametrize("case", POSITION_CASES)
def test_positions_equal_transformers_get_rope_index(tiny3, case):
    net, tok, _ = tiny3
    rows, row_clip = POSITION_CASES[case]
    clips = [clip3(*shape[:3], is_video=shape[3], seed=i) for i, (_, shape) in enumerate(rows) if shape]
    clip_rows = [c for c in row_clip if c is not None]
    clips = [clips[clip_rows.index(c)] for c in sorted(set(clip_rows))]
    batch = batch3(net, tok, [text for text, _ in rows], clips, row_clip)
    grids = {k: v for k, v in media_inputs(batch).items() if k.endswith("grid_thw")}
    hf, _ = net.model.get_rope_index(batch.input_ids, batch.mm_types, attention_mask=batch.attention_mask, **grids)
    assert torch.equal(batch.position_ids, hf)
    if any(clip.is_video and clip.grid_thw[0] > 1 for clip in clips):  # a block restarts time: rows of blocks repeat
        row = batch.mm_types[0] == 2
        assert batch.position_ids[0, 0, row].unique().numel() == clips[0].grid_thw[0]


def test_video_prompt_equals_the_qwen3_processor(tmp_path, tiny3):
    """The prompt ids of a real video read as Qwen3-VL: the chat template's
    `<|vision_start|><|video_pad|><|vision_end|>` replaced by what Qwen3VLProcessor.replace_video_token builds from
    the frames' metadata (its timestamps by its own _calculate_timestamps), as the released processor replaces it
    (transformers 5.24's generic expansion replaces the pad alone, which would wrap each block twice: DETAILS.md)."""
    _, tok, _ = tiny3
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(23)]
    path = str(tmp_path / "v.mp4")
    synthetic.write_mp4(path, frames, 5)  # 4.6 s at 5 fps: 8 frames sampled at 2 fps, not evenly spaced indices
    record = {"problem": "Which way?", "problem_type": "free-form", "data_type": "video", "path": path}
    config = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=32 * 32, max_pixels=6 * 32 * 32)
    frames, fps, times = data.read_media(record, **config, factor=32)
    clip = data.make_clip(frames, fps, times, QWEN3)
    ids, types = data.encode_prompt(tok, record, clip, 10_000, QWEN3)

    # the processor's pieces: the video's metadata (its fps and the sampled frames' indices) and the grid
    indices = np.linspace(0, 22, len(frames)).round().astype(int)
    metadata = types_ns(fps=5.0, frames_indices=indices)
    processor = types_ns(video_processor=types_ns(merge_size=2, temporal_patch_size=2),
                         vision_start_token="<|vision_start|>", video_token="<|video_pad|>",
                         vision_end_token="<|vision_end|>",
                         _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a))
    placeholder = Qwen3VLProcessor.replace_video_token(
        processor, {"video_grid_thw": torch.tensor([clip.grid_thw]), "video_metadata": [metadata]}, 0)
    assert placeholder.startswith("<0.3 seconds><|vision_start|>")  # frames 0 and 3 of the file: (0 + 0.6) / 2 s
    template = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|video_pad|><|vision_end|>" + data.question_text(record) +
                "<|im_end|>\n<|im_start|>assistant\n")
    expected = template.replace("<|vision_start|><|video_pad|><|vision_end|>", placeholder)
    assert ids == tok(expected, add_special_tokens=False).input_ids
    assert clip.grid_thw[0] == 4 and expected.count("seconds>") == 4
    # the processor's mm_token_type_ids: 2 on the video pads only
    assert types == [2 * (i == tok.convert_tokens_to_ids("<|video_pad|>")) for i in ids]
    # Qwen3-VL's 16-px patches: 3 * 2 * 16 * 16 values per patch, 0.5-normalised
    assert clip.pixel_values.shape[1] == 3 * 2 * 16 * 16
    assert torch.allclose(clip.pixel_values[0, 0], torch.tensor(frames[0, 0, 0, 0] / 255 / 0.5 - 1).float())


def types_ns(**kwargs):
    return types.SimpleNamespace(**kwargs)


def completion_case(net, tok):
    clips = [clip3(4, 64, 64, seed=1), clip3(4, 64, 64, seed=2), clip3(1, 64, 96, is_video=False, seed=3)]
    row_clip = [0, 0, 1, 2, None, 1]  # rows share clips; an image and a text-only row too
    texts = ["red", "red square", "blue", "what colour?", "hello", "it moves right"]
    batch = batch3(net, tok, texts, clips, row_clip)
    completion = torch.randint(10, 200, (6, 5), generator=torch.Generator().manual_seed(0))
    return batch, completion


def test_vision_once_with_deepstack_equals_transformers_forward(tiny3):
    """Log-probs and parameter gradients of our vision-once path (DeepStack features scattered into every row of a
    clip) equal transformers' own forward with each row's pixels and its own positions, in fp32."""
    net, tok, _ = tiny3
    net.zero_grad()
    batch, completion = completion_case(net, tok)
    mask = torch.ones_like(completion)
    ours, ours_grads = ours_with_grads(net, batch, completion, mask)

    P = batch.input_ids.shape[1]
    ids = torch.cat([batch.input_ids, completion], 1)
    logits = net(input_ids=ids, attention_mask=torch.cat([batch.attention_mask, mask], 1),
                 mm_token_type_ids=torch.cat([batch.mm_types, torch.zeros_like(completion)], 1),
                 **media_inputs(batch)).logits[:, P - 1:-1]
    assert_matches_transformers(net, ours, ours_grads, logits, completion)
    for name in ("model.visual.deepstack_merger_list.0.linear_fc1.weight", "model.visual.pos_embed.weight"):
        assert ours_grads[name].abs().sum() > 0  # gradients reach DeepStack's mergers and the position table
    net.zero_grad()


def test_deepstack_changes_the_output(tiny3):
    """Without its DeepStack features the forward differs: the test above could not pass with them dropped."""
    net, tok, _ = tiny3
    batch, completion = completion_case(net, tok)
    with torch.no_grad():
        prompt = M.embed_prompts(net, batch)
        full = M.hidden_states(net, prompt.embeds, batch.position_ids, batch.attention_mask, None, prompt.deepstack,
                               prompt.vision_mask)
        without = M.hidden_states(net, prompt.embeds, batch.position_ids, batch.attention_mask)
    assert len(prompt.deepstack) == 2 and (full - without).abs().max() > 1e-3


def test_greedy_generation_equals_transformers_greedy(tiny3):
    """Video, image and text prompts, left-padded: our prefill + static-KV-cache decode (q/k norms per head) gives
    transformers' greedy tokens, token for token."""
    net, tok, _ = tiny3
    batch, _ = completion_case(net, tok)
    ours, mask = M.generate(net, batch, 12, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    ref = net.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, mm_token_type_ids=batch.mm_types,
                       **media_inputs(batch), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    ref = ref[:, batch.input_ids.shape[1]:]
    assert ours.shape[1] == ref.shape[1]
    assert torch.equal(ours * mask, ref * mask)


@pytest.fixture(scope="module")
def sft3(toy, tmp_path_factory):
    """The tiny Qwen3-VL (the toy task's tokenizer) after 2 SFT steps on the toy task: (data_dir, SFT run folder)."""
    data_dir, _ = toy
    root = tmp_path_factory.mktemp("qwen3_run")
    model_path = str(root / "tiny-qwen3-vl")
    records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
    synthetic.ensure_tiny_model(model_path, [data.question_text(r) + data.sft_target(r) for r in records],
                                model_type="qwen3_vl")
    out = str(root / "sft")
    code, output = run_script("sft.py", f"--data_dir={data_dir}", f"--model_path={model_path}", f"--out_dir={out}",
                              "--max_steps=2", "--batch_size=2", "--grad_accum=1", "--val_records=4",
                              "--eval_interval=2", "--warmup_steps=1", "--ckpt_interval=2")
    assert code == 0, output[-6000:]
    return data_dir, out


def run_tgrpo3(sft3, out_dir, *args, nproc=1):
    data_dir, sft_out = sft3
    code, output = run_script("tgrpo.py", f"--data_dir={data_dir}", f"--init_from={sft_out}", f"--out_dir={out_dir}",
                              "--max_steps=2", "--batch_size=2", "--num_generations=4", "--num_contrast=2",
                              "--max_new_tokens=6", "--lr=1e-3", "--ckpt_interval=2", *args, nproc=nproc)
    assert code == 0, output[-6000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.slow
@pytest.mark.parametrize("timestamps", data.CONTRAST_TIMESTAMPS)
def test_tgrpo_and_eval_run_the_tiny_qwen3_end_to_end(sft3, tmp_path, timestamps):
    """SFT (the fixture), then T-GRPO from its folder and eval of T-GRPO's: the family comes from the folders alone."""
    metrics = run_tgrpo3(sft3, tmp_path / "tgrpo", f"--contrast_timestamps={timestamps}")
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    config = json.load(open(tmp_path / "tgrpo" / "step_000002" / "config.json"))
    assert config["model_type"] == "qwen3_vl"
    data_dir, _ = sft3
    summary, _ = run_eval((data_dir, tmp_path / "tgrpo"), tmp_path / "eval", "--shuffled=True",
                          f"--contrast_timestamps={timestamps}")
    assert summary["samples"] > 0 and summary["failed"] == 0


def test_contrast_keeps_timestamps_in_order_unless_told(toy, tiny3):
    """The default contrast clip shuffles the frames under timestamps in time order (the prompt is the ordered one's);
    contrast_timestamps="shuffled" moves the timestamps with their frames, so the prompt differs."""
    data_dir, _ = toy
    _, tok, _ = tiny3
    records, _ = data.load_records(os.path.join(data_dir, "rl.json"))
    record = next(r for r in records if r["data_type"] == "video")
    config = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=3136, max_pixels=128 * 28 * 28,
                  total_pixels=0, max_prompt_tokens=10_000, prompt_style="reasoning")
    ordered = data.load_example(record, tok, config | {"contrast_timestamps": "ordered"},
                                np.random.default_rng(0), QWEN3)
    shuffled = data.load_example(record, tok, config | {"contrast_timestamps": "shuffled"},
                                 np.random.default_rng(0), QWEN3)
    prompt, clip, contrast, contrast_prompt = ordered
    assert contrast.timestamps == clip.timestamps and contrast_prompt is prompt
    assert not torch.equal(contrast.pixel_values, clip.pixel_values)
    assert torch.equal(shuffled[2].pixel_values, contrast.pixel_values)  # the same frame order either way
    assert shuffled[2].timestamps != clip.timestamps
    assert shuffled[3] != prompt


@pytest.mark.slow
def test_two_process_zero3_tgrpo_on_the_tiny_qwen3(sft3, tmp_path):
    metrics = run_tgrpo3(sft3, tmp_path, "--deepspeed=configs/ds_zero3.json", nproc=2)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics) and metrics[-1]["grad_norm"] > 0


@pytest.mark.slow
def test_gpu_check_runs_qwen3_8b_shapes_on_cpu_small():
    """bench.py's GPU check with Qwen3-VL-8B's architecture made narrow (its vocabulary, ids, interleaved M-RoPE,
    DeepStack, timestamped blocks): every measurement prints, and the vision-once log-probs equal transformers'."""
    # 2 ordered rows and 1 shuffled, as test_bench.py's GPU check: rows still share each clip
    code, output = run_script("bench.py", "configs/bench_gpu.py", "configs/bench_gpu_qwen3.py",
                              "--random_7b=qwen3_small", "--frames=4", "--height=64", "--width=128",
                              "--new_tokens=3", "--repeats=1", "--num_generations=2",
                              "--num_contrast=1")
    assert code == 0, output[-4000:]
    # a difference of two timed calls at 3 new tokens: negative on a loaded CPU at times
    assert re.search(r"decode   LoRA rank 64 -?[\d.]+ ms/token", output)
    assert float(re.search(r"max \|diff\| of log-probs (\S+)", output).group(1)) < 1e-4


def test_qwen3_configs_apply_to_their_scripts():
    """configs/*qwen3* on top of the paper configs: every key exists in its script with the right type."""
    import common
    import sft
    import tgrpo
    stacks = ((sft, ["sft_paper.py", "sft_qwen3_8b.py"]),
              (tgrpo, ["tgrpo_paper.py", "tgrpo_qwen3_8b.py"]),
              (tgrpo, ["tgrpo_paper.py", "tgrpo_qwen3_8b.py", "tgrpo_qwen3_8b_lora_1gpu.py"]))
    here = os.path.dirname(os.path.abspath(__file__))
    for script, names in stacks:
        config = common.configure(dict(script.config), [os.path.join(here, "configs", name) for name in names])
        assert config["min_pixels"] == 128 * 32 * 32 and config["max_pixels"] == 256 * 32 * 32
        assert config["total_pixels"] == 1024 * 32 * 32 and config["max_frames"] == 16


@pytest.mark.slow
def test_lora_tgrpo_on_the_tiny_qwen3(sft3, tmp_path):
    """LoRA adapters on the Qwen3 text layers (q/k norms untouched), decoded from merged copies."""
    metrics = run_tgrpo3(sft3, tmp_path, "--lora_rank=4", "--lora_alpha=8")
    # (the gradient may be 0: 2 steps of an untrained model can give every rollout of a group the same reward)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in metrics)
    assert os.path.isfile(tmp_path / "step_000002" / "adapter" / "adapter_config.json")

# ----------------------------------------------------------------------------- frames: Qwen3-VL's qwen-vl-utils
# An independent transcription of the reference, QwenLM/Qwen3-VL's qwen-vl-utils/src/qwen_vl_utils/vision_process.py
# (qwen-vl-utils 0.0.14: smart_nframes, smart_resize, fetch_video's video bounds), written from its text, not from
# data.py, in the reference's own terms: an option not given takes the reference's default.
REF_FRAME_FACTOR = 2           # frames per temporal patch: frame counts are even
REF_VIDEO_MIN_TOKENS = 128     # a video frame's default floor, in tokens
REF_VIDEO_MAX_TOKENS = 768     # a video frame's ceiling under the clip budget, in tokens
REF_SEQ_LEN = 128_000          # MODEL_SEQ_LEN: the default clip budget is 0.9 of it, in tokens
REF_MAX_RATIO = 200


def ref_nframes(total, video_fps, fps, min_frames, max_frames):
    """smart_nframes given fps, min_frames and max_frames: the frames at fps, clamped into the even limits and the
    video's length, then floored to even; outside [2, total] it is an error."""
    lowest = math.ceil(min_frames / REF_FRAME_FACTOR) * REF_FRAME_FACTOR
    highest = math.floor(max_frames / REF_FRAME_FACTOR) * REF_FRAME_FACTOR
    wanted = total / video_fps * fps
    clamped = min(min(max(wanted, lowest), highest), total)
    nframes = math.floor(clamped / REF_FRAME_FACTOR) * REF_FRAME_FACTOR
    if not REF_FRAME_FACTOR <= nframes <= total:
        raise ValueError(f"nframes {nframes} outside [2, {total}]")
    return nframes


def ref_smart_resize(height, width, factor, min_pixels, max_pixels):
    """The reference's smart_resize: multiples of factor (at least one), scaled into the bounds. Unlike
    transformers' (data.smart_resize), its scaled-down side has no lower bound."""
    if max(height, width) / min(height, width) > REF_MAX_RATIO:
        raise ValueError("aspect ratio")
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_height = math.floor(height / scale / factor) * factor
        new_width = math.floor(width / scale / factor) * factor
    elif new_height * new_width < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * scale / factor) * factor
        new_width = math.ceil(width * scale / factor) * factor
    return new_height, new_width


def ref_video_size(height, width, nframes, factor, min_pixels=None, max_pixels=None, total_pixels=None,
                   ceiling_tokens=REF_VIDEO_MAX_TOKENS, headroom=1.05):
    """fetch_video's frame size: the clip budget over its temporal patches, between the frame floor x 1.05 and the
    768-token ceiling; a given max_pixels may only lower that cap. (ceiling_tokens and headroom exist to show the
    grid below needs each term.)"""
    if min_pixels is None:
        min_pixels = REF_VIDEO_MIN_TOKENS * factor * factor
    if total_pixels is None:
        total_pixels = REF_SEQ_LEN * factor * factor * 0.9
    ceiling = ceiling_tokens * factor * factor
    cap = max(min(ceiling, total_pixels / nframes * REF_FRAME_FACTOR), int(min_pixels * headroom))
    if max_pixels is not None:
        cap = min(max_pixels, cap)
    return ref_smart_resize(height, width, factor, min_pixels, cap)


T32 = 32 * 32
T28 = 28 * 28
# configs/*qwen3*: min_pixels, max_pixels, total_pixels
QWEN3_BOUNDS = (128 * T32, 256 * T32, 1024 * T32)
# (total frames, source fps, sampling fps, min_frames, max_frames, (H, W), factor, min_pixels, max_pixels,
# total_pixels): None in a pixel bound is "not given" to the reference; data.py is then given the value that means
# the same (max_pixels 768 tokens; total_pixels 0, none, which the reference's 115,200-token default equals here)
FRAME_CASES = {
    "10 s at 30 fps, Qwen3 config: the floor x 1.05": (300, 30, 2.0, 4, 16, (360, 640), 32, *QWEN3_BOUNDS),
    "3.9 s at 30 fps: 6 frames, max_pixels binds": (117, 30, 2.0, 4, 16, (720, 1280), 32, *QWEN3_BOUNDS),
    "1.5 s: raised to min_frames": (45, 30, 2.0, 4, 16, (1080, 1920), 32, *QWEN3_BOUNDS),
    "2-frame video": (2, 30, 2.0, 4, 16, (240, 320), 32, *QWEN3_BOUNDS),
    "7 frames at 2 fps: odd, floored to 6": (7, 2, 2.0, 4, 16, (360, 640), 32, *QWEN3_BOUNDS),
    "5 frames, min_frames 8": (5, 2, 2.0, 8, 16, (360, 640), 32, *QWEN3_BOUNDS),
    "10 min at 60 fps, 4K": (36000, 60, 2.0, 4, 16, (2160, 3840), 32, *QWEN3_BOUNDS),
    "4 s of 4K: 8 frames, budget = max_pixels": (240, 60, 2.0, 4, 16, (2160, 3840), 32, *QWEN3_BOUNDS),
    "4K, reference defaults: 768-token ceiling": (240, 60, 2.0, 4, 16, (2160, 3840), 32, None, None, None),
    "reference defaults, 64 frames of 1080p": (9000, 30, 2.0, 4, 64, (1080, 1920), 32, None, None, None),
    "low source fps 0.5: 80 s": (40, 0.5, 2.0, 4, 16, (360, 640), 32, *QWEN3_BOUNDS),
    "1 fps, 3 frames: fewer than wanted": (3, 1, 2.0, 4, 16, (360, 640), 32, *QWEN3_BOUNDS),
    "240 fps, 2 s": (480, 240, 2.0, 4, 16, (720, 1280), 32, *QWEN3_BOUNDS),
    "tiny 8 x 12 frames, upscaled": (100, 25, 2.0, 4, 16, (8, 12), 32, *QWEN3_BOUNDS),
    "tiny 20 x 30, small budget": (100, 25, 2.0, 4, 16, (20, 30), 32, 4 * T32, 256 * T32, 64 * T32),
    "small budget: the 1.05 floor binds": (1000, 25, 2.0, 4, 32, (480, 640), 32, 64 * T32, 768 * T32, 256 * T32),
    "max_pixels above the ceiling, 4K": (240, 60, 2.0, 4, 16, (2160, 3840), 32, 128 * T32, 16384 * T32,
                                         20480 * T32),
    "budget between floor and max": (1000, 25, 2.0, 4, 16, (1080, 1920), 32, 64 * T32, 768 * T32, 2048 * T32),
    "max_pixels below the floor x 1.05": (300, 30, 2.0, 4, 16, (480, 640), 32, 128 * T32, 128 * T32, 1024 * T32),
    "odd min_frames 5 and max_frames 15": (60, 30, 2.0, 5, 15, (360, 640), 32, *QWEN3_BOUNDS),
    "odd max_frames 15 binds": (900, 30, 2.0, 5, 15, (360, 640), 32, *QWEN3_BOUNDS),
    "min_frames = max_frames = 8": (90, 30, 2.0, 8, 8, (480, 640), 32, *QWEN3_BOUNDS),
    "max_frames 2": (300, 30, 2.0, 2, 2, (480, 640), 32, *QWEN3_BOUNDS),
    "sampling at 1 fps": (300, 30, 1.0, 4, 16, (360, 640), 32, *QWEN3_BOUNDS),
    "sampling at 4 fps": (90, 30, 4.0, 4, 32, (360, 640), 32, *QWEN3_BOUNDS),
    "portrait 1920 x 1080": (150, 30, 2.0, 4, 16, (1920, 1080), 32, *QWEN3_BOUNDS),
    "eval: 64 frames, 128-256 tokens, budget off": (9000, 30, 2.0, 4, 64, (1080, 1920), 32, 128 * T32, 256 * T32,
                                                   None),
    "Qwen2.5-VL paper config, budget off": (300, 30, 2.0, 4, 16, (1080, 1920), 28, 128 * T28, 105369, None),
    "Qwen2.5-VL 28-px tokens, budget on": (117, 30, 2.0, 4, 16, (720, 1280), 28, 128 * T28, 256 * T28, 1024 * T28),
}


@pytest.mark.parametrize("case", FRAME_CASES)
def test_frame_count_indices_and_size_follow_qwen3_qwen_vl_utils(case):
    total, video_fps, fps, min_frames, max_frames, (height, width), factor, low, high, budget = FRAME_CASES[case]
    expected_n = ref_nframes(total, video_fps, fps, min_frames, max_frames)
    expected_indices = torch.linspace(0, total - 1, expected_n).round().long().tolist()
    expected_size = ref_video_size(height, width, expected_n, factor, low, high, budget)

    # data.py's path (read_video's): the same values, "not given" as the value meaning it
    min_pixels = low
    if min_pixels is None:
        min_pixels = 128 * factor * factor
    max_pixels = high
    if max_pixels is None:
        max_pixels = 768 * factor * factor
    total_pixels = budget
    if total_pixels is None:
        total_pixels = 0
    nframes = data._num_frames(total, video_fps, fps, min_frames, max_frames)
    indices = data._sample_indices(total, video_fps, fps, min_frames, max_frames)
    cap = data.frame_max_pixels(nframes, min_pixels, max_pixels, total_pixels, factor)
    size = data.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=cap)
    assert (nframes, indices, size) == (expected_n, expected_indices, expected_size)


def test_every_term_of_the_frame_cap_decides_some_case():
    """The grid is not vacuous: without any one term of the reference's cap (the clip budget, the 768-token
    ceiling, the 1.05 headroom over the floor, a given max_pixels lowering it) some case's frame size changes."""
    needed = set()
    for case in FRAME_CASES.values():
        total, video_fps, fps, min_frames, max_frames, (height, width), factor, low, high, budget = case
        nframes = ref_nframes(total, video_fps, fps, min_frames, max_frames)
        frame = (height, width, nframes, factor)
        size = ref_video_size(*frame, low, high, budget)
        without = {"budget": ref_video_size(*frame, low, high, math.inf),
                   "ceiling": ref_video_size(*frame, low, high, budget, ceiling_tokens=math.inf),
                   "headroom": ref_video_size(*frame, low, high, budget, headroom=1.0),
                   "max_pixels": ref_video_size(*frame, low, None, budget)}
        needed |= {term for term, other in without.items() if other != size}
    assert needed == {"budget", "ceiling", "headroom", "max_pixels"}


QWEN3_CLIP = dict(zip(("min_pixels", "max_pixels", "total_pixels"), QWEN3_BOUNDS), fps=2.0, min_frames=4)


@pytest.mark.parametrize("clip,max_frames", [("shared", 16), ("shared", 8), ("generated", 16)])
def test_read_video_follows_qwen3_qwen_vl_utils(tmp_path, clip, max_frames):
    """A real clip through data.read_video at Qwen3-VL's 32-px tokens under the clip budget (configs/*qwen3*): the
    reference's frame count, indices and size, frames resized as torchvision's antialiased bicubic, and each frame's
    time its index over the source fps (the metadata the reference hands the processor)."""
    import decord
    if clip == "shared":
        from test_data import SHARED_VIDEO
        if not SHARED_VIDEO.exists():
            pytest.skip(f"{SHARED_VIDEO} is not present")
        path = str(SHARED_VIDEO)
    else:
        rng = np.random.default_rng(0)
        path = str(tmp_path / "v.mp4")
        # 5.8 s at 5 fps: 11.6 frames wanted, floored to 10; 200 x 300 is upscaled to the 128-token floor
        synthetic.write_mp4(path, [rng.integers(0, 255, (200, 300, 3), dtype=np.uint8) for _ in range(29)], 5)
    frames, fps, times = data.read_video(path, max_frames=max_frames, factor=32, **QWEN3_CLIP)

    reader = decord.VideoReader(path)
    total, video_fps = len(reader), reader.get_avg_fps()
    nframes = ref_nframes(total, video_fps, 2.0, 4, max_frames)
    indices = torch.linspace(0, total - 1, nframes).round().long().tolist()
    height, width = ref_video_size(*reader[0].shape[:2], nframes, 32, *QWEN3_BOUNDS)
    raw = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(raw, size=(height, width), mode="bicubic", antialias=True)
    expected = resized.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert frames.shape == (nframes, height, width, 3) and np.array_equal(frames, expected)
    assert fps == pytest.approx(nframes / total * video_fps)
    assert np.allclose(times, np.array(indices) / video_fps)


def test_the_clip_budget_reaches_the_frames_through_load_example(tmp_path, tokenizer):
    """load_example hands the config's total_pixels to the reader (Qwen3-VL's 32-px tokens): 16 frames of 640 x 360
    under the paper's clip budget get the 1.05 x 128-token cap, as Video-R1's frames; without a budget, max_pixels."""
    path = str(tmp_path / "v.mp4")
    synthetic.write_mp4(path, [np.full((360, 640, 3), 8 * i, np.uint8) for i in range(32)], 4)
    record = {"problem": "Which way?", "problem_type": "free-form", "data_type": "video", "path": path,
              "json": "rl.json", "index": 0}
    config = dict(QWEN3_CLIP, max_frames=16, max_prompt_tokens=10_000, prompt_style="reasoning")
    _, clip, *_ = data.load_example(record, tokenizer, config, fam=QWEN3)
    assert clip.grid_thw == (8, 256 // 16, 480 // 16)  # 120 tokens a patch
    _, clip, *_ = data.load_example(record, tokenizer, config | {"total_pixels": 0}, fam=QWEN3)
    assert clip.grid_thw == (8, 352 // 16, 640 // 16)  # 220 tokens a patch
