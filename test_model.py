"""model.py on the tiny Qwen2.5-VL: positions, vision once, hand-written generation, log-probs."""
import torch
import lifecycle
import pytest
from transformers import Qwen2_5_VLForConditionalGeneration
import bench
import common as C
import family
import model as M
from conftest import assert_matches_transformers, encode_text, ours_with_grads, random_clip

def batch_of(net, tok, rows, clips, row_clip):
    encoded = [encode_text(tok, text, clips[c] if c is not None else None) for text, c in zip(rows, row_clip)]
    return M.collate_prompts(encoded, clips, tok.pad_token_id, net.config, row_clip=row_clip)


def test_video_positions_follow_the_checkpoint_rule_not_transformers_5(tiny):
    net, tok, _ = tiny
    clip = random_clip(8, 112, 112, second_per_grid=1.0)  # 8 temporal patches of 1 s, a 4x4 merged grid
    ids, types = encode_text(tok, "red", clip)
    start = types.index(2)
    pos = family.qwen2_5_positions(types, clip, net.config)
    block = pos[:, start:start + clip.num_tokens]
    assert block[0].unique().tolist() == [start + 2 * t for t in range(8)]  # 1 s x 2 tokens/s apart
    assert block[1].unique().tolist() == block[2].unique().tolist() == [start + i for i in range(4)]
    after = start + clip.num_tokens
    assert pos[:, after].tolist() == [start + 14 + 1] * 3  # largest vision position (the last frame) + 1
    hf, _ = net.model.get_rope_index(torch.tensor([ids]), torch.tensor([types]), second_per_grid_ts=torch.tensor([1.0]),
                                     video_grid_thw=torch.tensor([clip.grid_thw]))
    assert hf[0, 0, after].item() == start + 4  # transformers 5.24 resumes at start + max(h, w)/2: overlapping frames
    assert torch.equal(hf[:, 0, :after], pos[:, :after])  # the vision block itself agrees


def test_image_positions_equal_transformers(tiny):
    net, tok, _ = tiny
    clip = random_clip(1, 56, 112, is_video=False)
    ids, types = encode_text(tok, "what colour is the square?", clip)
    hf, _ = net.model.get_rope_index(torch.tensor([ids]), torch.tensor([types]),
                                     image_grid_thw=torch.tensor([clip.grid_thw]))
    assert torch.equal(hf[:, 0], family.qwen2_5_positions(types, clip, net.config))


def test_missing_mm_token_type_ids_changes_the_output(tiny):
    """transformers 5 silently gives media tokens 1-D positions without mm_token_type_ids; our path must match the
    3-D one, and the two must differ, or this test could not catch the mistake."""
    net, tok, _ = tiny
    clip = random_clip(1, 56, 112, is_video=False)
    ids, types = encode_text(tok, "what colour is the square?", clip)
    batch = M.collate_prompts([(ids, types)], [clip], tok.pad_token_id, net.config)
    kwargs = dict(input_ids=batch.input_ids, pixel_values=clip.pixel_values,
                  image_grid_thw=torch.tensor([clip.grid_thw]))
    with torch.no_grad():
        with_types = net(**kwargs, mm_token_type_ids=batch.mm_types).logits
        without = net(**kwargs).logits
        embeds = M.embed_prompts(net, batch).embeds
        ours = net.lm_head(M.hidden_states(net, embeds, batch.position_ids, batch.attention_mask))
    torch.testing.assert_close(ours, with_types, rtol=0, atol=1e-5)
    assert (without - with_types).abs().max() > 1e-3


def transformers_video_logits(net, batch, completion, mask, clips, row_clip):
    """(B, T, V) the plain transformers forward's logits of each completion token, each row's pixels repeated."""
    B, T = completion.shape
    P = batch.input_ids.shape[1]
    positions = torch.cat([batch.position_ids, (batch.next_pos[:, None] + torch.arange(T)).expand(3, B, T)], dim=2)
    return net(input_ids=torch.cat([batch.input_ids, completion], 1),
               attention_mask=torch.cat([batch.attention_mask, mask], 1), position_ids=positions,
               pixel_values_videos=torch.cat([clips[c].pixel_values for c in row_clip]),
               video_grid_thw=torch.tensor([clips[c].grid_thw for c in row_clip])).logits[:, P - 1:-1]


def test_vision_once_equals_pixels_repeated_per_row(tiny):
    """Log-probs and parameter gradients equal the plain transformers forward with each row's pixels repeated."""
    net, tok, _ = tiny
    net.zero_grad()
    clips = [random_clip(4, 56, 56, seed=1), random_clip(4, 56, 56, seed=2)]
    row_clip = [0, 0, 0, 1, 1]  # three rows share the ordered clip, two the shuffled one
    batch = batch_of(net, tok, ["red", "red square", "blue", "red", "it moves right"], clips, row_clip)
    completion = torch.randint(10, 200, (5, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    ours, ours_grads = ours_with_grads(net, batch, completion, mask)

    logits = transformers_video_logits(net, batch, completion, mask, clips, row_clip)
    assert_matches_transformers(net, ours, ours_grads, logits, completion)
    assert ours_grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0  # gradients do reach the vision tower
    net.zero_grad()


def test_rows_sharing_a_prompt_run_it_once_and_equal_transformers(tiny):
    """T-GRPO's G rows repeat one prompt: it runs once (a prompt pass, then the completions over copies of its
    cache), and the log-probs and gradients still equal the plain transformers forward of every row."""
    net, tok, _ = tiny
    net.zero_grad()
    clips = [random_clip(4, 56, 56, seed=1), random_clip(4, 56, 56, seed=2)]
    row_clip = [0, 0, 0, 1, 1, 0]
    texts = ["red", "red", "blue square", "red", "red", "red"]  # 3 distinct prompts: (0, red), (0, blue), (1, red)
    batch = batch_of(net, tok, texts, clips, row_clip)
    shared = M.shared_prompts(batch)
    assert shared.first == [0, 2, 3] and shared.of_row.tolist() == [0, 0, 1, 2, 2, 0]
    completion = torch.randint(10, 200, (6, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0  # a stopped row: its pads are masked out as keys too
    ours, ours_grads = ours_with_grads(net, batch, completion, mask, share_prompts=True)

    logits = transformers_video_logits(net, batch, completion, mask, clips, row_clip)
    assert_matches_transformers(net, ours, ours_grads, logits, completion)
    net.zero_grad()


def test_generation_of_rows_sharing_a_prompt_equals_each_prompt_alone(tiny):
    """The prefill runs each distinct prompt once; greedy rows equal the prompt generated on its own."""
    net, tok, _ = tiny
    clips = [random_clip(4, 56, 56, seed=5), random_clip(2, 56, 112, second_per_grid=0.5, seed=6)]
    texts = ["which way does it move?", "red", "which way does it move?", "red"]
    batch = batch_of(net, tok, texts, clips, [0, 1, 0, 1])
    assert len(M.shared_prompts(batch).first) == 2
    ours, mask = M.generate(net, batch, 8, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    for row in (0, 1):
        alone, alone_mask = M.generate(net, batch_of(net, tok, texts[row:row + 1], clips, [row]), 8,
                                       [tok.eos_token_id], tok.pad_token_id, temperature=0)
        for b in (row, row + 2):
            n = int(alone_mask.sum())
            assert int(mask[b].sum()) == n and torch.equal(ours[b, :n], alone[0, :n])


def test_greedy_generation_equals_model_generate(tiny):
    """Image and text prompts of different lengths, left-padded: token for token (both position rules agree here)."""
    net, tok, _ = tiny
    clips = [random_clip(1, 56, 84, is_video=False, seed=3), random_clip(1, 112, 56, is_video=False, seed=4)]
    row_clip = [0, 1, None, 0]
    texts = ["what colour?", "what shape is the object in the picture?", "hello", "the red square"]
    batch = batch_of(net, tok, texts, clips, row_clip)
    ours, mask = M.generate(net, batch, 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    image_rows = [c for c in row_clip if c is not None]
    ref = net.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, mm_token_type_ids=batch.mm_types,
                       pixel_values=torch.cat([clips[c].pixel_values for c in image_rows]),
                       image_grid_thw=torch.tensor([clips[c].grid_thw for c in image_rows]),
                       max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = ref[:, batch.input_ids.shape[1]:]
    assert ours.shape[1] == ref.shape[1]
    assert torch.equal(ours * mask, ref * mask)


def test_video_generation_equals_naive_loop_without_cache(tiny):
    net, tok, _ = tiny
    clips = [random_clip(4, 56, 56, second_per_grid=1.0, seed=5), random_clip(2, 56, 112, second_per_grid=0.5, seed=6)]
    row_clip = [0, 1, 0]
    texts = ["which way does it move?", "red", "what appears first, the red or the blue square?"]
    batch = batch_of(net, tok, texts, clips, row_clip)
    ours, mask = M.generate(net, batch, 8, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    ids, attn, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    embed = net.model.get_input_embeddings()
    with torch.no_grad():
        vision = M.embed_prompts(net, batch).embeds
        for step in range(ours.shape[1]):
            embeds = torch.cat([vision, embed(ids[:, batch.input_ids.shape[1]:])], 1)
            token = net.lm_head(M.hidden_states(net, embeds, pos, attn)[:, -1]).argmax(-1)
            assert torch.equal(token[mask[:, step].bool()], ours[mask[:, step].bool(), step])
            ids = torch.cat([ids, ours[:, step:step + 1]], 1)
            attn = torch.cat([attn, torch.ones(3, 1, dtype=torch.long)], 1)
            pos = torch.cat([pos, (batch.next_pos + step).view(1, 3, 1).expand(3, 3, 1)], 2)


def test_sampling_is_seeded_and_respects_top_p(tiny):
    net, tok, _ = tiny
    clip = random_clip(2, 56, 56)
    batch = batch_of(net, tok, ["red", "blue"], [clip], [0, 0])
    run = lambda seed: M.generate(net, batch, 6, [tok.eos_token_id], tok.pad_token_id, temperature=1.0,
                                  generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(1), run(1))
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    draws = {M.sample_token(logits, 1.0, 0.5, torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {0}  # token 0 alone holds > 0.5 of the mass
    assert M.sample_token(logits, 0, 1.0, None).item() == 0


@pytest.fixture(scope="module")
def real_vocab():
    """Qwen2.5-VL-7B's vocabulary (152,064 ids, special ones at 151643-151656) with 2 narrow layers a tower."""
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(bench.config_7b(small=True)).eval()


def logprobs_and_grads(net, batch, completion, mask, slices=8):
    net.zero_grad()
    logp = M.completion_logprobs(net, batch, completion, mask, slices)
    (logp * mask).sum().backward()
    return logp.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_logprob_slices_equal_one_pass_at_the_real_vocabulary(real_vocab):
    """The head and log-softmax run on slices of the tokens, each recomputed in backward: values and
    gradients equal one slice's, and no vocab-wide tensor is kept for backward (B x T x 152,064 fp32 logits were
    3.7 GB at 8 rows x 768 tokens, and backward held about four of them)."""
    net, config = real_vocab, real_vocab.config
    clip = random_clip(2, 56, 56, seed=7)
    ids = [config.vision_start_token_id] + [config.video_token_id] * clip.num_tokens + [config.vision_end_token_id]
    batch = M.collate_prompts([(ids + [100, 200], [0] + [2] * clip.num_tokens + [0, 0, 0])] * 3, [clip], 0, config,
                              row_clip=[0] * 3)
    completion = torch.tensor([[151645, 5, 152063, 151643], [7, 151656, 9, 0], [1, 2, 3, 4]])  # special ids too
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    whole, whole_grads = logprobs_and_grads(net, batch, completion, mask, slices=1)
    sliced, sliced_grads = logprobs_and_grads(net, batch, completion, mask, slices=5)  # > rows, < tokens
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)  # float rounding: sums split differently
    assert whole_grads.keys() == sliced_grads.keys() and "lm_head.weight" in whole_grads
    for name, grad in whole_grads.items():
        # sums over 152,064 ids split differently: up to ~1e-5 of the tensor's largest gradient on some CPUs (AMD EPYC
        # here); a slicing error would be of the gradient's own size
        scale = grad.abs().max().item()
        torch.testing.assert_close(sliced_grads[name], grad, rtol=1e-4, atol=3e-5 * scale, msg=name)
    widest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: widest.append(t.shape[-1]) or t, lambda t: t):
        M.completion_logprobs(net, batch, completion, mask)
    assert max(widest) < config.text_config.vocab_size


@pytest.mark.slow
def test_placeholder_batch_runs_every_module_at_zero_gradient(real_vocab):
    """What a rank whose records all failed trains on: the vision tower and every layer run forward and backward
    (under ZeRO each is a collective the other ranks wait for), the loss and every gradient exactly 0."""
    net = real_vocab
    batch, completion, mask = lifecycle.placeholder_batch(net, "cpu")
    logp, grads = logprobs_and_grads(net, batch, completion, mask)
    assert torch.isfinite(logp).all() and (logp * mask).sum() == 0
    assert len(grads) == len(list(net.parameters())) and all(not g.any() for g in grads.values())
