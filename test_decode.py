"""model.generate's static-cache decode against the loop it replaced (generate_reference, below): greedy and sampled
tokens, stops checked every k tokens, LoRA decoded from merged copies, the step compiled whole. On CPU, and on a GPU
too where one is present (there the step is replayed as a CUDA graph)."""
import copy
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration
import bench
import model as M
from conftest import random_clip, encode_text

DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available()


@torch.no_grad()
def generate_reference(model, batch, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, generator=None):
    """model.generate as it was before the static cache (commit 2fa9c2c), kept as the reference: a DynamicCache
    that grows by concatenation, the language model's forward (its mask rebuilt) every token, a stop check every
    token. Through peft's layers a LoRA model runs its adapters unmerged."""
    inner = M.unwrap(model)
    embed_tokens = inner.model.get_input_embeddings()
    B = batch.input_ids.shape[0]
    device = batch.attention_mask.device
    cache = DynamicCache(config=inner.config)
    mask = batch.attention_mask
    prompt = M.embed_prompts(model, batch)
    hidden = M.hidden_states(model, prompt.embeds, batch.position_ids, mask, cache, prompt.deepstack,
                             prompt.vision_mask)
    last = hidden[:, -1]
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        logits = inner.lm_head(last).float()
        token = M.sample_token(logits, temperature, top_p, generator)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        text_pos = (batch.next_pos + step).view(1, B, 1).expand(3, B, 1)
        token_embeds = embed_tokens(token[:, None])
        last = M.hidden_states(model, token_embeds, text_pos, mask, cache)[:, -1]
    ids = torch.stack(tokens, dim=1)
    is_stop = torch.isin(ids, stop).long()
    stops_before = is_stop.cumsum(1) - is_stop
    return ids, (stops_before == 0).long()


def recorded_logits(monkeypatch):
    """A list that fills with the logits every sample_token call sees."""
    seen = []
    sample = M.sample_token

    def recording(logits, *args):
        seen.append(logits.clone())
        return sample(logits, *args)
    monkeypatch.setattr(M, "sample_token", recording)
    return seen


def mixed_batch(net, tok, device):
    """Video, image and text prompts of different lengths (left padding), two rows sharing a clip."""
    clips = [random_clip(4, 56, 56, seed=5), random_clip(1, 112, 56, is_video=False, seed=4)]
    row_clip = [0, 1, None, 0, 1]
    texts = ["which way does it move?", "red", "hello", "what appears first, the red or the blue square?", "shape?"]
    encoded = [encode_text(tok, text, clips[c] if c is not None else None) for text, c in zip(texts, row_clip)]
    return M.collate_prompts(encoded, clips, tok.pad_token_id, net.config, device, row_clip)


def stops_at_different_steps(ids):
    """Stop ids that end every row of a run without stops early: row b's token at step 2 + 3b. Each row stops there
    or sooner, where it emits another row's stop token first."""
    return [ids[b, 2 + 3 * b].item() for b in range(ids.shape[0])]


def assert_same_generation(net, batch, pad_id, n, temperature, top_p, device, monkeypatch, every=(1, 3, 8)):
    """Without stops, then with stops found in that run, for each stop_every in `every` and one past the longest
    completion (a single check at the end): the same ids and mask as the reference loop.

    Sampled, the same tokens from the same seed. The logits agree to 1e-5, not bit for bit: attention over the
    static cache sums over its masked columns too, and the longer row changes the order of the kernel's sums (over
    the filled columns alone the CPU logits were bit-identical). An ulp of difference moves a sampled token only if
    a draw lands within an ulp of a boundary between two tokens."""
    def run(generate, stops, **kwargs):
        generator = torch.Generator(device).manual_seed(7)
        return generate(net, batch, n, stops, pad_id, temperature, top_p, generator, **kwargs)
    ref_logits = recorded_logits(monkeypatch)
    ref, ref_mask = run(generate_reference, [])
    monkeypatch.undo()
    ours_logits = recorded_logits(monkeypatch)
    ours, mask = run(M.generate, [])
    monkeypatch.undo()
    assert torch.equal(ours, ref) and torch.equal(mask, ref_mask) and ours.shape == (len(batch.row_clip), n)
    for a, b in zip(ours_logits, ref_logits, strict=True):
        torch.testing.assert_close(a.log_softmax(-1), b.log_softmax(-1), rtol=0, atol=1e-5)

    stops = stops_at_different_steps(ref)
    ref, ref_mask = run(generate_reference, stops)
    assert ref.shape[1] < n and 0 < ref_mask.sum(1).min() < ref_mask.sum(1).max()  # early, at different steps
    for k in (*every, n + 5):
        ours, mask = run(M.generate, stops, stop_every=k)
        assert torch.equal(ours, ref) and torch.equal(mask, ref_mask), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature, top_p", [(0, 1.0), (1.0, 1.0), (1.0, 0.9)])
def test_tiny_model_generates_as_the_reference_loop(tiny, device, temperature, top_p, monkeypatch):
    net, tok, _ = tiny
    net = net.to(device)
    try:
        batch = mixed_batch(net, tok, device)
        assert_same_generation(net, batch, tok.pad_token_id, 24, temperature, top_p, device, monkeypatch)
    finally:
        net.to("cpu")


@pytest.fixture(scope="module")
def small_7b():
    """bench's narrow model with Qwen2.5-VL-7B's vocabulary, heads and ids (random weights, fp32)."""
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(bench.config_7b(small=True)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_7b_shaped_model_generates_as_the_reference_loop(small_7b, tiny, temperature, monkeypatch):
    """GQA of 4 query heads over 2 key/value heads of width 128, mrope_section [16, 24, 24], 152,064 ids; prompts
    in the tiny tokenizer's ids with the 7B's special ids (the 7B's vocabulary holds both)."""
    net, config = small_7b, small_7b.config
    tok = tiny[1]
    clip = random_clip(2, 56, 112, seed=8)
    video = [config.vision_start_token_id] + [config.video_token_id] * clip.num_tokens + [config.vision_end_token_id]
    question = tok("what appears first, the red or the blue square?", add_special_tokens=False).input_ids
    prompts = [(video + question, [0] + [2] * clip.num_tokens + [0] * (1 + len(question))),
               (video + question[:3], [0] + [2] * clip.num_tokens + [0] * 4),
               (question[:5], [0] * 5)]
    batch = M.collate_prompts(prompts, [clip], 0, config, row_clip=[0, 0, None])
    assert_same_generation(net, batch, 0, 12, temperature, 1.0, "cpu", monkeypatch, every=(5,))


def test_cache_is_allocated_once_at_a_bucketed_size(tiny, monkeypatch):
    net, tok, _ = tiny
    batch = mixed_batch(net, tok, "cpu")
    filled = []
    fill = M.Decoder.fill

    def tracked(self, cache):
        fill(self, cache)
        filled.append((self, [k.data_ptr() for k in self.keys + self.values], cache))
    monkeypatch.setattr(M.Decoder, "fill", tracked)
    M.generate(net, batch, 30, [], tok.pad_token_id, temperature=0)
    (decoder, addresses, prefill_cache), = filled
    P = batch.input_ids.shape[1]
    L = decoder.length
    assert L % M.CACHE_BUCKET == 0 and P + 30 <= L < P + 30 + M.CACHE_BUCKET
    assert len(decoder.keys) == len(decoder.values) == net.config.text_config.num_hidden_layers
    assert all(k.shape == (5, 2, L, 32) for k in decoder.keys + decoder.values)
    assert [k.data_ptr() for k in decoder.keys + decoder.values] == addresses  # written in place, never grown
    assert not prefill_cache.layers  # the prefill's cache was emptied as it was copied
    assert decoder.mask[:, P:].sum(1).tolist() == [29] * 5  # the 29 tokens fed back (the 30th is never decoded)
    assert decoder.index.item() == P + 28 and not any(k[:, :, P + 29:].any() for k in decoder.keys)


def lora_model(net, seed=0):
    """A copy of `net` with rank-8 adapters on every projection, B nonzero (peft's init_lora_weights=False)."""
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=32, target_modules=targets, init_lora_weights=False,
                        exclude_modules=r"(?!model\.language_model).*")
    return get_peft_model(copy.deepcopy(net), config).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_lora_decodes_from_merged_copies_as_the_unmerged_model(tiny, device):
    """The same greedy tokens as peft's unmerged forward, other tokens than the base model's (the adapters act), and
    every training weight (base and adapters) bit-identical after generate."""
    net, tok, _ = tiny
    lora = lora_model(net).to(device)
    batch = mixed_batch(net, tok, device)
    before = {name: p.detach().clone() for name, p in lora.named_parameters()}
    ours, mask = M.generate(lora, batch, 16, [], tok.pad_token_id, temperature=0)
    ref, ref_mask = generate_reference(lora, batch, 16, [], tok.pad_token_id, temperature=0)
    assert torch.equal(ours, ref) and torch.equal(mask, ref_mask)
    base, _ = M.generate(net.to(device), batch, 16, [], tok.pad_token_id, temperature=0)
    net.to("cpu")
    assert not torch.equal(base, ours)
    after = dict(lora.named_parameters())
    assert before.keys() == after.keys()
    for name, weight in before.items():
        assert torch.equal(after[name], weight), name


def test_linear_weights_merge_only_active_adapters(tiny):
    net, _, _ = tiny
    lora = lora_model(net)
    q = M.unwrap(lora).model.language_model.layers[0].self_attn.q_proj
    weight, bias = M.linear_weights(q)
    base = q.get_base_layer()
    adapter = q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"]  # (out, in)
    torch.testing.assert_close(weight, base.weight + adapter, rtol=0, atol=1e-6)
    assert weight.data_ptr() != base.weight.data_ptr() and bias is base.bias
    with lora.disable_adapter():
        assert M.linear_weights(q)[0] is base.weight
    plain = net.model.language_model.layers[0].self_attn.q_proj
    assert M.linear_weights(plain)[0] is plain.weight


@pytest.mark.slow
def test_decode_step_compiles_whole(tiny):
    """torch.compile(fullgraph=True) fails on any graph break, so none can creep into the step unseen; the compiled
    step gives the eager step's logits, and generate(compile_step=True) its tokens."""
    net, tok, _ = tiny
    batch = mixed_batch(net, tok, "cpu")
    with torch.no_grad():
        decoder = M.Decoder(net, batch, 8)
        hidden_cache = DynamicCache(config=net.config)
        M.hidden_states(net, M.embed_prompts(net, batch).embeds, batch.position_ids, batch.attention_mask,
                        hidden_cache)
        decoder.fill(hidden_cache)
        decoder.advance(torch.tensor([5, 6, 7, 8, 9]))
        eager = decoder.step()
        compiled = torch.compile(decoder.step, fullgraph=True, dynamic=False)()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    ours, mask = M.generate(net, batch, 6, [], tok.pad_token_id, temperature=0, compile_step=True)
    ref, ref_mask = generate_reference(net, batch, 6, [], tok.pad_token_id, temperature=0)
    assert torch.equal(ours, ref) and torch.equal(mask, ref_mask)
