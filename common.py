"""Run machinery shared by the scripts: the configurator, distributed set-up, the optimizer and lr
schedule, ZeRO helpers and atomic checkpoints. Nothing here knows T-GRPO or the model; tgrpo.py,
model.py and lifecycle.py hold those."""
import ast
import contextlib
import datetime
import importlib.util
import json
import math
import os
import shutil
import sys
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# a torch.Generator seed drawn from a numpy stream: 62 bits stay clear of int64's sign
SEED_BITS = 62
# the scripts' attention default: flash attention where the package is installed
ATTN = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


# The configurator: nanoGPT's, made strict.

def configure(namespace, argv, choices=None):
    """Apply config files (python assignments, e.g. configs/tgrpo_paper.py) and --key=value, in
    order, to a script's config block (its globals of plain types). Unknown keys, other types and
    values outside `choices` raise at once."""
    config = {}
    for key, value in namespace.items():
        if not key.startswith("_") and type(value) in (int, float, bool, str):
            config[key] = value
    for arg in argv:
        # one argument's overrides: a --key=value or everything a config file assigns
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

        # each override is checked against the default it replaces
        for key, value in overrides.items():
            if key not in config:
                raise ValueError(f"unknown config key {key!r} (from {arg})")
            if type(config[key]) is float and type(value) is int:
                value = float(value)
            if type(value) is not type(config[key]):
                expected = type(config[key]).__name__
                raise TypeError(f"config {key}: expected {expected}, got {value!r} (from {arg})")
            if value not in (choices or {}).get(key, [value]):
                allowed = choices[key]
                raise ValueError(f"config {key}: {value!r} is not one of {allowed} (from {arg})")
            config[key] = value
    namespace.update(config)
    return config


# Distributed: one code path, whatever the number of processes.

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def setup_distributed(threads=0, seed=0, timeout=900):
    """torchrun's environment switches distributed mode on (any number of nodes); returns the
    device. threads > 0 fixes a CPU run's thread count: summation order, hence every bit, depends
    on it (DETAILS.md). `timeout`: the seconds a collective waits for the other ranks before the
    run fails (the scripts' dist_timeout)."""
    # all sampling uses explicit generators; this covers anything else
    torch.manual_seed(seed + RANK)
    cuda = torch.cuda.is_available()
    if WORLD > 1:
        wait = datetime.timedelta(seconds=timeout)
        # DeepSpeed makes groups of its own (ZeRO's copy of the world group) without a timeout,
        # which then take torch's default for the backend (gloo 30 min, NCCL 10): ours instead
        c10d.default_pg_timeout = wait
        c10d.default_pg_nccl_timeout = wait
        dist.init_process_group("nccl" if cuda else "gloo", timeout=wait)
    if not cuda:
        torch.set_num_threads(threads or torch.get_num_threads())
        return "cpu"
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    torch.cuda.set_device(device)
    return device


def mean_over_ranks(values, device, sums=()):
    """{name: value} averaged over ranks (NaN where no rank had a value, e.g. p with no video
    prompt), by name in sorted order; the names in `sums` (counts) are added up instead."""
    names = sorted(values)  # one order on every rank, however each built its dict
    rows = []
    for name in names:
        if math.isnan(values[name]):
            rows.append([0.0, 0.0])  # this rank had no value: it adds nothing to sum or count
        else:
            rows.append([values[name], 1.0])
    totals = torch.tensor(rows, device=device, dtype=torch.float64)  # (names, 2): sum, count
    if WORLD > 1:
        dist.all_reduce(totals)

    result = {}
    for name, (total, count) in zip(names, totals.tolist()):
        if name in sums:
            result[name] = total
        elif count:
            result[name] = total / count
        else:
            result[name] = math.nan
    return result


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish():
    """End a worker at once: gloo sometimes aborts at interpreter exit after all work is done
    (DETAILS.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


# The optimizer, the lr schedule and ZeRO.

def read_deepspeed_config(path):
    """A DeepSpeed json with what the scripts decide themselves filled in: one micro-batch per
    backward (the scripts accumulate by hand: Optimizer.backward) and bf16 exactly when on GPU."""
    with open(path) as f:
        ds = json.load(f)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds.setdefault("bf16", {})["enabled"] = torch.cuda.is_available()
    return ds


class Optimizer:
    """AdamW behind one interface for 1 process, N processes (gradients averaged by hand) and
    DeepSpeed ZeRO (a torch client optimizer: no C++ ops built). `model` is what the scripts run
    forward: under ZeRO the DeepSpeed engine."""

    def __init__(self, model, lr, weight_decay, grad_clip, deepspeed_config=""):
        self.grad_clip = grad_clip
        self.engine = None
        self.model = model
        ds = {}
        if deepspeed_config:
            ds = read_deepspeed_config(deepspeed_config) | {"gradient_clipping": grad_clip}
        # ZeRO offload steps on the CPU: fused AdamW is as fast there as DeepSpeed's (None: default)
        fused = "offload_optimizer" in ds.get("zero_optimization", {}) or None
        # with LoRA: the adapters (and the merger) only
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
        if ds:
            import deepspeed
            if not dist.is_initialized():
                # no torchrun: a group of one process, else DeepSpeed would look for MPI
                os.environ.setdefault("LOCAL_RANK", "0")
                dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1)
            self.engine, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=self.opt,
                                                               config=ds)
            self.model = self.engine

    def backward(self, loss, last=True):
        """Add the gradient of `loss`; last=False for every micro-batch but a step's last
        (DeepSpeed's accumulation boundary)."""
        if self.engine:
            # the scripts run the engine's module directly, so do what engine.forward does first
            self.engine.optimizer.clear_backward_seen_flag()
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self, lr):
        """Average gradients over ranks, clip, step at `lr`; returns the gradient norm before
        clipping."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.engine:
            self.engine.step()
            return float(self.engine.get_global_grad_norm() or 0.0)

        params = [p for g in self.opt.param_groups for p in g["params"]]
        if WORLD > 1:
            # every rank reduces every parameter, so a rank whose batch left one unused cannot hang
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
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
    """Under ZeRO-3, weights gathered and per-module hooks removed for the whole rollout phase,
    which every rank must enter: each hook call is a collective, so ranks decoding different
    numbers of tokens fell out of step."""
    if is_zero3(model):
        from deepspeed.runtime.zero import unwrap_model_for_generation
        return unwrap_model_for_generation(model)
    return contextlib.nullcontext()


# The data position, and what a run may start or resume from.

def stream_position(consumed, steps, batch_size, micro=0, grad_accum=1, rank=RANK):
    """Where `rank`'s batch_size records of micro-step `micro` start in the endless record stream
    (data.epoch_slice), `steps` steps after the run's first: the `consumed` records before that
    step (0, or a resumed run's from its checkpoint), then every step's micro-steps, each every
    rank's batch in rank order. So a run resumed on another number of ranks reads on where the
    stream stopped. With micro=0 and rank=0: the records all ranks consumed in those steps too."""
    batches = (steps * grad_accum + micro) * WORLD + rank
    return consumed + batches * batch_size


def check_out_dir(out_dir, resume):
    """Refuse a new run (not `resume`) in a folder that holds a run: its log would be cut and its
    checkpoints replaced, and the folder would end with parts of two runs."""
    if resume:
        return
    latest = latest_checkpoint(out_dir)
    logged = os.path.exists(os.path.join(out_dir, "metrics.jsonl"))
    if not latest and not logged:
        return
    name = "none, only metrics.jsonl"
    if latest:
        name = os.path.basename(latest)
    raise FileExistsError(f"out_dir {out_dir} already holds a run (latest: {name}): --resume=True "
                          "continues it; choose another out_dir to start afresh (or delete it)")


def check_resume(ckpt, config, run_keys):
    """ckpt's run.json, if a run of `config` may resume from it. Refused: a checkpoint without the
    data position (written before run.json held it), another value of a key in `run_keys` (those
    that define the run: the data stream, the starting weights, the form of the model and
    optimizer state; the first names the starting weights), and under DeepSpeed another number
    of ranks (its optimizer state is split by rank). Any other changed key is taken, with a note.
    Reads run.json only: nothing has loaded yet."""
    with open(os.path.join(ckpt, "run.json")) as f:
        run = json.load(f)
    fresh = f"start a new run in another out_dir from its weights with --{run_keys[0]}={ckpt}"
    if "consumed" not in run:
        raise ValueError(f"{ckpt} has no data position in its run.json: it was written before "
                         "checkpoints kept one, so a resumed run would not know which records "
                         f"come next. Resume it with the code that wrote it, or {fresh}")

    # the keys that define the run
    saved = run["config"]
    differ = []
    for key in run_keys:
        if saved.get(key) != config[key]:
            differ.append(f"{key} {saved.get(key)!r} in the checkpoint, {config[key]!r} now")
    if differ:
        raise ValueError(f"cannot resume {ckpt} with other values of the keys that define the "
                         f"run: {'; '.join(differ)}. Pass the checkpoint's values to resume it, "
                         f"or {fresh}")

    # DeepSpeed's optimizer state is partitioned by rank: it loads on as many ranks only
    ranks = run["world_size"]
    if config["deepspeed"] and ranks != WORLD:
        raise ValueError(
            f"{ckpt} was saved by {ranks} ranks under DeepSpeed, whose optimizer state is split "
            f"by rank, and this run has {WORLD}: resume it on {ranks} ranks, or {fresh} (under "
            f"LoRA the merged weights there, or --{run_keys[0]}={ckpt}/adapter for the adapter), "
            "which starts the optimizer state, the lr schedule and the data position afresh")

    # any other key: taken, and said
    changed = []
    for key, value in config.items():
        if key != "resume" and saved.get(key) != value:
            changed.append(f"{key} {saved.get(key)!r} -> {value!r}")
    if changed:
        print0(f"resuming {ckpt} with changed settings: {', '.join(changed)}")
    return run


# Checkpoints, written atomically.

def save_checkpoint(out_dir, step, optimizer, config, write_model, consumed):
    """Write out_dir/step_N: the model's files by write_model(folder, state_dict) on rank 0, the
    optimizer or DeepSpeed state, run.json (the step, the records all ranks `consumed` so far,
    the number of ranks and the config: check_resume reads them). It is written under a
    temporary name and renamed into place before `latest` is replaced: a kill at any moment
    leaves the last good checkpoint whole.
    No RNG state: all randomness comes from generators seeded by (seed, step, rank).
    Beyond the newest keep_checkpoints (0: all stay), a checkpoint keeps its HF weights only
    (keep_weights) or goes. Returns the step folder."""
    keep = config.get("keep_checkpoints", 0)
    keep_weights = config.get("keep_weights", True)
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"

    # write everything under the temporary name
    if RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state_dict = None
    # every rank writes its own ZeRO partition, rank 0 the gathered 16-bit weights;
    # under LoRA none of the frozen base
    try:
        if optimizer.engine:
            # save_latest=False: step_N/latest would be DeepSpeed's; `latest` is ours
            optimizer.engine.save_checkpoint(tmp, tag="deepspeed", save_latest=False,
                                             exclude_frozen_parameters=True)
            if is_zero3(optimizer.model):  # all ranks take part
                engine = optimizer.engine
                state_dict = engine._zero3_consolidated_16bit_state_dict(
                    exclude_frozen_parameters=True)
        if RANK == 0:
            write_model(tmp, state_dict)  # the model's files (lifecycle.write_model)
            if not optimizer.engine:
                torch.save(optimizer.opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
            run = {"step": step, "consumed": consumed, "world_size": WORLD, "config": config}
            write_atomic(os.path.join(tmp, "run.json"), json.dumps(run, indent=1))
    except (OSError, RuntimeError) as err:
        # a full disk: torch.save says "[enforce fail at inline_container.cc]"
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out_dir) or "none was written before"
        raise RuntimeError(f"writing {final} failed ({str(err)[:200]}); "
                           f"the previous checkpoint is intact: {previous}") from err
    barrier()  # every rank's files are in place before the folder is renamed

    # rename into place
    if RANK == 0:
        if os.path.exists(final):
            # a rerun of the same step: the old folder stays whole until the new one is in place
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)

        # point `latest` at it
        write_atomic(os.path.join(out_dir, "latest"), os.path.basename(final))

    # prune the checkpoints before the newest `keep` up to this step (a resumed run's future stays)
    if RANK == 0 and keep:
        names = os.listdir(out_dir)
        steps = sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())
        done = [s for s in steps if s <= step]
        for old in done[:-keep]:
            path = os.path.join(out_dir, f"step_{old:06d}")
            if keep_weights:
                _delete(f"{path}/optimizer.pt")
                _delete(f"{path}/deepspeed")
            else:
                _delete(path)
    barrier()
    return final


def _delete(path):
    """Delete a file or folder if it exists, renamed first: a kill midway leaves no part of it under
    its name."""
    if not os.path.exists(path):
        return
    os.replace(path, path + ".del")
    if os.path.isdir(path + ".del"):
        shutil.rmtree(path + ".del")
    else:
        os.remove(path + ".del")


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


# Logs.

def open_log(path, step):
    """Rank 0's jsonl log of a run at `step`, to append to line by line (None on other ranks),
    without its lines of later steps (a resumed run redoes them; a plot must not see a step twice)
    or a last line cut by a kill."""
    if RANK != 0:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(kept))
    return open(path, "a", buffering=1)  # line-buffered: each line goes out whole as it is written


def open_wandb(config):
    """Weights & Biases on rank 0 when config's wandb_log is on (else None): log_metrics then sends
    it every metrics line too. wandb is imported only here (pip install wandb; WANDB_MODE=offline
    writes the run to ./wandb without a network)."""
    if not config["wandb_log"] or RANK != 0:
        return None
    import wandb
    wandb.init(project=config["wandb_project"], name=config["wandb_run_name"], config=config)
    return wandb


def log_metrics(log, metrics, show, wandb=None):
    """A step's metrics (or a sample episode) as one line of open_log's `log` (rank 0), also to
    open_wandb's `wandb` when given, printed when `show`."""
    if log:
        log.write(json.dumps(metrics) + "\n")
    if wandb:
        wandb.log(metrics)
    if show:
        # floats to 4 significant digits, anything else as it is
        fields = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in metrics.items()]
        print0(" | ".join(fields))
