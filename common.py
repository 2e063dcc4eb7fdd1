"""Run machinery shared by the scripts: the configurator, distributed set-up, the optimizer and lr schedule, ZeRO
helpers and atomic checkpoints. Nothing here knows T-GRPO; tgrpo.py and model.py hold the algorithm."""
import ast
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import torch
import torch.distributed as dist

SEED_BITS = 62  # a torch.Generator seed drawn from a numpy stream: 62 bits stay clear of int64's sign
ATTN = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"  # the scripts' attention default

# ----------------------------------------------------------------------------- configurator (nanoGPT's, strict)
def configure(namespace, argv, choices=None):
    """Apply config files (python assignments, e.g. configs/tgrpo_paper.py) and --key=value, in order, to a script's
    config block (its globals of plain types). Unknown keys, other types, values outside `choices` raise at once."""
    config = {k: v for k, v in namespace.items() if not k.startswith("_") and type(v) in (int, float, bool, str)}
    for arg in argv:
        overrides = {}
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"expected --key=value, got {arg!r}")
            try:
                overrides[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                overrides[key] = text  # a bare word is a string
        else:
            with open(arg) as f:
                exec(f.read(), {}, overrides)
        for key, value in overrides.items():
            if key not in config:
                raise ValueError(f"unknown config key {key!r} (from {arg})")
            if type(config[key]) is float and type(value) is int:
                value = float(value)
            if type(value) is not type(config[key]):
                raise TypeError(f"config {key}: expected {type(config[key]).__name__}, got {value!r} (from {arg})")
            if value not in (choices or {}).get(key, [value]):
                raise ValueError(f"config {key}: {value!r} is not one of {choices[key]} (from {arg})")
            config[key] = value
    namespace.update(config)
    return config

# ----------------------------------------------------------------------------- distributed, one code path
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def print0(*args, **kwargs):
    if RANK == 0:
        print(*args, **kwargs, flush=True)

def setup_distributed(threads=0, seed=0):
    """torchrun's environment switches distributed mode on (any number of nodes); returns the device to use.
    threads > 0 fixes a CPU run's thread count: summation order, hence every bit, depends on it (DETAILS.md)."""
    torch.manual_seed(seed + RANK)  # all sampling uses explicit generators; this covers anything else
    cuda = torch.cuda.is_available()
    if WORLD > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(threads or torch.get_num_threads())
        return "cpu"
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    torch.cuda.set_device(device)
    return device

def mean_over_ranks(values, device, sums=()):
    """{name: value} averaged over ranks (NaN where no rank had a value, e.g. p with no video prompt), by name in
    sorted order; the names in `sums` (counts) are added up instead."""
    names = sorted(values)  # one order on every rank, however each built its dict
    t = torch.tensor([[values[k], 1.0] if not math.isnan(values[k]) else [0.0, 0.0] for k in names], device=device,
                     dtype=torch.float64)
    if WORLD > 1:
        dist.all_reduce(t)
    return {k: s if k in sums else s / n if n else math.nan for k, (s, n) in zip(names, t.tolist())}

def barrier():
    if dist.is_initialized():
        dist.barrier()

def finish():
    """End a worker at once: gloo sometimes aborts at interpreter exit after all work is done (DETAILS.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)

# ----------------------------------------------------------------------------- optimizer, lr, ZeRO
def read_deepspeed_config(path):
    """A DeepSpeed json with what the scripts decide themselves filled in: one micro-batch per backward (the scripts
    accumulate by hand: Optimizer.backward) and bf16 exactly when on GPU."""
    with open(path) as f:
        ds = json.load(f)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds.setdefault("bf16", {})["enabled"] = torch.cuda.is_available()
    return ds

class Optimizer:
    """AdamW behind one interface for 1 process, N processes (gradients averaged by hand) and DeepSpeed ZeRO (a torch
    client optimizer: no C++ ops built). `model` is what the scripts run forward: under ZeRO the DeepSpeed engine."""

    def __init__(self, model, lr, weight_decay, grad_clip, deepspeed_config=""):
        self.grad_clip, self.engine, self.model = grad_clip, None, model
        ds = read_deepspeed_config(deepspeed_config) | {"gradient_clipping": grad_clip} if deepspeed_config else {}
        fused = "offload_optimizer" in ds.get("zero_optimization", {}) or None  # a CPU step: as fast as DeepSpeed's
        params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters (and merger) only
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
        if ds:
            import deepspeed
            if not dist.is_initialized():  # no torchrun: one process, else DeepSpeed would look for MPI
                os.environ.setdefault("LOCAL_RANK", "0")
                dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1)
            self.engine, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=self.opt, config=ds)
            self.model = self.engine

    def backward(self, loss, last=True):
        """Add the gradient of `loss`; last=False for every micro-batch but a step's last (DeepSpeed's boundary)."""
        if self.engine:  # the scripts run the engine's module directly, so do what engine.forward does first
            self.engine.optimizer.clear_backward_seen_flag()
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self, lr):
        """Average gradients over ranks, clip, step at `lr`; returns the gradient norm before clipping."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.engine:
            self.engine.step()
            return float(self.engine.get_global_grad_norm() or 0.0)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if WORLD > 1:  # every rank reduces every parameter, so a rank whose batch left one unused cannot hang
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm.item()

def cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

def is_zero3(model):
    return hasattr(model, "zero_optimization_stage") and model.zero_optimization_stage() == 3

def generation_phase(model):
    """Under ZeRO-3, weights gathered and per-module hooks (each call a collective, so ranks decoding different
    numbers of tokens fell out of step) removed for the whole rollout phase, which every rank must enter."""
    if is_zero3(model):
        from deepspeed.runtime.zero import unwrap_model_for_generation
        return unwrap_model_for_generation(model)
    return contextlib.nullcontext()

# ----------------------------------------------------------------------------- checkpoints, atomic
def save_checkpoint(out_dir, step, optimizer, config, write_model):
    """Write out_dir/step_N (the model's files by write_model(folder, state_dict) on rank 0; optimizer or DeepSpeed
    state; run.json) under a temporary name, renamed into place before `latest` is replaced: a kill at any moment leaves the
    last good checkpoint whole. No RNG state: all randomness comes from generators seeded by (seed, step, rank).
    Beyond the newest keep_checkpoints (0: all stay), a checkpoint keeps its HF weights only (keep_weights) or goes."""
    keep, keep_weights = config.get("keep_checkpoints", 0), config.get("keep_weights", True)
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state_dict = None
    try:  # every rank writes its own ZeRO partition, rank 0 the gathered 16-bit weights; LoRA: none of the frozen base
        if optimizer.engine:
            optimizer.engine.save_checkpoint(tmp, tag="deepspeed", save_latest=False,  # step_N/latest: ours
                                             exclude_frozen_parameters=True)
            if is_zero3(optimizer.model):  # all ranks take part
                state_dict = optimizer.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        if RANK == 0:
            write_model(tmp, state_dict)  # the model's files (lifecycle.write_model)
            if not optimizer.engine:
                torch.save(optimizer.opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
            write_atomic(os.path.join(tmp, "run.json"), json.dumps({"step": step, "config": config}, indent=1))
    except (OSError, RuntimeError) as err:  # a full disk: torch.save says "[enforce fail at inline_container.cc]"
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing {final} failed ({str(err)[:200]}); the previous checkpoint is intact: "
                           f"{latest_checkpoint(out_dir) or 'none was written before'}") from err
    barrier()  # every rank's files are in place before the folder is renamed
    if RANK == 0:
        if os.path.exists(final):  # a rerun of the same step: the old one stays whole until the new one is in place
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        write_atomic(os.path.join(out_dir, "latest"), os.path.basename(final))
        steps = sorted(int(n[5:]) for n in os.listdir(out_dir) if n.startswith("step_") and n[5:].isdigit())
        for old in [s for s in steps if s <= step][:-keep] if keep else []:  # a resumed run's future stays
            path = os.path.join(out_dir, f"step_{old:06d}")
            for gone in [f"{path}/optimizer.pt", f"{path}/deepspeed"] if keep_weights else [path]:
                if os.path.exists(gone):  # renamed first: a kill midway leaves no part of it under its name
                    os.replace(gone, gone + ".del")
                    (shutil.rmtree if os.path.isdir(gone + ".del") else os.remove)(gone + ".del")
    barrier()
    return final

def latest_checkpoint(out_dir):
    path = os.path.join(out_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return os.path.join(out_dir, f.read().strip())

def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

def open_log(path, step):
    """Rank 0's jsonl log of a run at `step`, to append to line by line (None on other ranks), without its lines of
    later steps (a resumed run redoes them; a plot must not see a step twice) or a last line cut by a kill."""
    if RANK != 0:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            write_atomic(path, "".join(line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step))
    return open(path, "a", buffering=1)  # line-buffered: each line goes out whole as it is written

def log_metrics(log, metrics, show):
    """A step's metrics (or a sample episode) as one line of open_log's `log` (rank 0), printed when `show`."""
    if log:
        log.write(json.dumps(metrics) + "\n")
    if show:
        print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
