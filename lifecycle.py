"""The model's life cycle in a run: loading a checkpoint folder (with LoRA adapters or without),
the start or resume of training, the KL reference, the placeholder batch of a rank without data,
and the model's part of a checkpoint (HF weights; under LoRA the adapter and the merged weights).

The forward pass lives in model.py, the generic run machinery (configurator, ranks, optimizer,
atomic folders) in common.py; this module joins the two for the training scripts."""
import json
import os
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer
import common
import data
import family
import model

# a LoRA checkpoint's subfolder holding the adapter in peft's format
ADAPTER = "adapter"
# the adapter settings a resumed LoRA run must share with the checkpoint
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")


def load_model(path, device, grad_ckpt=False, attn="sdpa", dtype=None, lora=None):
    """Qwen2.5-VL or Qwen3-VL (the folder's config says which) from a local folder: bf16 on GPU,
    fp32 on CPU unless told; never runs remote code.

    `lora` (a LoraConfig) adds fresh adapters. An adapter folder loads on the (absolute) base
    folder its adapter_config.json names: merged, or trainable when `lora` is given and matches it
    (a LoRA run resuming)."""
    adapter = None
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        adapter = path
        path = LoraConfig.from_pretrained(adapter).base_model_name_or_path
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        # else transformers would ask the hub for it by name
        raise FileNotFoundError(
            f"{path}: not a checkpoint folder (no config.json; models load from local folders)")
    if dtype is None:
        on_gpu = torch.device(device).type == "cuda"
        dtype = torch.bfloat16 if on_gpu else torch.float32
    net = family.of_folder(path).model_class.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, trust_remote_code=False)
    net = net.to(device)
    if grad_ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # the adapters: loaded from a checkpoint (merged for inference, trainable to resume) or fresh
    if adapter:
        net = PeftModel.from_pretrained(net, adapter, is_trainable=lora is not None)
        if lora is None:
            net = net.merge_and_unload()
        else:
            saved = [getattr(net.peft_config["default"], key) for key in LORA_KEYS]
            wanted = [getattr(lora, key) for key in LORA_KEYS]
            if saved != wanted:
                raise ValueError(f"{adapter} was trained with other lora_* settings "
                                 "than this run's")
    elif lora:
        net = get_peft_model(net, lora)
        targeted = {name.rsplit(".", 1)[1] for name in net.targeted_module_names}
        missing = lora.target_modules - targeted
        if missing:
            raise ValueError(f"lora_targets {sorted(missing)} match no module "
                             "of the language model")

    # the trained adapters in fp32, on a bf16 base too (peft: adapters only)
    if lora:
        for param in net.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return net, AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def trained_prompt_style(folder):
    """The prompt_style in a checkpoint folder's config.json (an adapter folder: its base's), or
    None where it has none (a released model)."""
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        folder = LoraConfig.from_pretrained(folder).base_model_name_or_path
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f).get("prompt_style")
    except (OSError, json.JSONDecodeError) as e:
        raise data.DataError(f"{path}: cannot read the checkpoint's config: {e}") from e


def resolve_prompt_style(config, folder):
    """A script's prompt_style, resolved before anything loads ("": the one the checkpoint in
    `folder` was trained with: data.prompt_style) and written back into `config`, so run.json keeps
    what ran; a style other than the model's own is said."""
    trained = trained_prompt_style(folder)
    style = data.prompt_style(config["prompt_style"], trained)
    if trained and style != trained:
        common.print0(f"note: prompt_style {style!r} as asked; {folder} was trained with "
                      f"{trained!r}")
    config["prompt_style"] = style
    return style


def lora_config(config):
    """peft's LoraConfig from a script's lora_* values (None: full fine-tuning).

    Targets match in the language model only (the vision tower has an mlp.gate_proj too);
    lora_merger trains a copy of the merger (modules_to_save)."""
    if not config["lora_rank"]:
        return None
    modules_to_save = None
    if config["lora_merger"]:
        modules_to_save = ["merger"]
    return LoraConfig(r=config["lora_rank"],
                      lora_alpha=config["lora_alpha"],
                      lora_dropout=config["lora_dropout"],
                      target_modules=config["lora_targets"].split(","),
                      exclude_modules=r"(?!model\.language_model).*",
                      modules_to_save=modules_to_save)


def training_dtype(config, device):
    """bf16 weights on GPU where DeepSpeed keeps fp32 masters or LoRA freezes the base; else fp32
    weights, trained under bf16 autocast on GPU (model.autocast)."""
    on_gpu = "cuda" in device
    if on_gpu and (config["deepspeed"] or config["lora_rank"]):
        return torch.bfloat16
    return torch.float32


def start_training(config, init, device, run_keys):
    """A training script's model (under ZeRO the DeepSpeed engine), tokenizer, Optimizer, first
    step and the records all ranks consumed before it (common.stream_position): from `init`, or
    resumed from out_dir's latest checkpoint (LoRA: its adapter, on the base it started from).

    Before any model loads, every rank refuses a new run in a used out_dir and a resume the
    checkpoint does not allow (common.check_out_dir, common.check_resume with the script's
    `run_keys`)."""
    common.check_out_dir(config["out_dir"], config["resume"])
    ckpt = None
    if config["resume"]:
        ckpt = common.latest_checkpoint(config["out_dir"])
        if not ckpt:
            common.print0(f"WARNING: resume=True but {config['out_dir']} holds no checkpoint: "
                          "starting at step 0")
    run = None
    if ckpt:
        run = common.check_resume(ckpt, config, run_keys)
    # every rank has checked before rank 0 writes (its log): else a slower rank would find the
    # new run's files and refuse
    common.barrier()

    # the weights: the checkpoint's (under LoRA its adapter) or the starting folder's
    path = init
    if ckpt and config["lora_rank"]:
        path = os.path.join(ckpt, ADAPTER)
    elif ckpt:
        path = ckpt
    dtype = training_dtype(config, device)
    net, tokenizer = load_model(path, device, config["grad_ckpt"], config["attn"], dtype,
                                lora_config(config))
    # the prompt it trains on goes into every checkpoint's config.json (resolve_prompt_style)
    model.unwrap(net).config.prompt_style = config["prompt_style"]
    opt = common.Optimizer(net, config["lr"], config["weight_decay"], config["grad_clip"],
                           deepspeed_config=config["deepspeed"])
    if not ckpt:
        return opt.model, tokenizer, opt, 0, 0

    # the optimizer state; under LoRA DeepSpeed's files hold no frozen base (save_checkpoint), so
    # they load non-strict
    if opt.engine:
        strict = model.lora_of(opt.model) is None
        opt.engine.load_checkpoint(ckpt, tag="deepspeed", load_module_strict=strict)
    else:
        state = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
        opt.opt.load_state_dict(state)
    return opt.model, tokenizer, opt, run["step"], run["consumed"]


def frozen_reference(path, policy, deepspeed_config="", attn="sdpa"):
    """Full fine-tuning's KL reference: a frozen copy of the starting policy, on its device and in
    its dtype.

    Under ZeRO-3 it is partitioned like the policy (DeepSpeed runs stage 3 without an optimizer);
    under ZeRO-2 each GPU holds it whole."""
    weight = next(model.unwrap(policy).parameters())
    ref, _ = load_model(path, weight.device, attn=attn, dtype=weight.dtype)
    ref = ref.requires_grad_(False).eval()
    if common.is_zero3(policy):
        import deepspeed
        ds_config = common.read_deepspeed_config(deepspeed_config)
        ref = deepspeed.initialize(model=ref, config=ds_config)[0]
    return ref


def placeholder_batch(policy, device):
    """(batch, ids, mask) for a rank whose records all failed: a 1-token video and 1 masked-out
    completion token.

    Zero loss and zero gradients, yet every module runs as on data, so the rank's ZeRO collectives
    stay in step with the other ranks'."""
    config = model.unwrap(policy).config
    patch = family.of(config).patch
    # one merged 2x2 patch of 2 frames (at time 0: Qwen3-VL's prompt would show it as text)
    pixels = torch.zeros(4, 3 * data.TEMPORAL_PATCH * patch ** 2)  # (4, patch_dim)
    clip = data.Clip(pixels, (1, 2, 2), True, 1.0, [0.0])
    ids = [config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]
    mm_types = [0, 2, 0]
    batch = model.collate_prompts([(ids, mm_types)], [clip], 0, config, device)
    completion_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    # nothing counts in the loss
    completion_mask = torch.zeros(1, 1, dtype=torch.long, device=device)  # (1, 1)
    return batch, completion_ids, completion_mask


def write_model(folder, state_dict, tokenizer, optimizer):
    """The model's files of a checkpoint, on rank 0: HF weights and the tokenizer; under LoRA also
    the adapter, and the weights merged as eval.py merges them (so any step folder loads as a
    plain model).

    `state_dict`: ZeRO-3's gathered 16-bit weights, or None to take them from the module."""
    lora = model.lora_of(optimizer.model)
    if lora:
        adapter = os.path.join(folder, ADAPTER)
        lora.save_pretrained(adapter, state_dict=state_dict)
        dtype = next(lora.parameters()).dtype
        merged, _ = load_model(adapter, "cpu", dtype=dtype)
        state_dict = merged.state_dict()
    model.unwrap(optimizer.model).save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def save_checkpoint(out_dir, step, tokenizer, optimizer, config, consumed):
    """common.save_checkpoint with this model's files (write_model); `consumed`: the records all
    ranks consumed up to `step`. Returns the step folder."""
    def write(folder, state_dict):
        write_model(folder, state_dict, tokenizer, optimizer)
    return common.save_checkpoint(out_dir, step, optimizer, config, write, consumed)
